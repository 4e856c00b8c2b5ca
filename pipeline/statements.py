"""Bank statements: an admin imports the account's statement; its lines are matched to EFT
enrollments waiting for approval, as pretix's bank-transfer plugin does for orders.

A line's match says what Skillpay found, with the reason:
- exact: our payment reference (SP-XXXXXXXX; any case, spaces or dashes, or none) and the
  amount due. Confirming approves all of them in one bulk job.
- amount_differs: the reference, another amount. An admin decides on the enrollment itself.
- amount_only: no reference; the amount of EFT enrollment(s) waiting (the only one, named).
- not_waiting / duplicate: the reference of an enrollment not waiting, or one another line
  matched already.
- unmatched: nothing of ours; ignored: money out.

Importing the same file again imports nothing (its SHA-256); a line already imported from an
overlapping statement is skipped (its fingerprint); an enrollment is the exact match of one
line at most (a unique index); confirming twice, or by two admins at once, approves once.
"""

from __future__ import annotations

import codecs
import csv
import hashlib
import io
import re
from collections import Counter, defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import date, datetime
from decimal import Decimal, InvalidOperation

from sqlalchemy import func, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, joinedload

from config import Settings
from models import (
    BankStatement,
    BulkJob,
    Enrollment,
    Payment,
    PaymentMethod,
    State,
    StatementLine,
    User,
    utcnow,
)
from pipeline import bulk
from pipeline.errors import Conflict, InvalidRequest, NotFound
from pipeline.payments import REFERENCE_ALPHABET, rand

MAX_BYTES = 5 * 1024 * 1024
MAX_LINES = 50_000
MATCHES = (
    "exact",
    "amount_differs",
    "amount_only",
    "not_waiting",
    "duplicate",
    "unmatched",
    "ignored",
)
_REF_CHAR = f"[{REFERENCE_ALPHABET}]"
# SP, then up to a few separators, then 8 reference characters, each optionally followed by a
# space or dash (a student typing "sp abcd efgh"); not inside a longer word on either side.
REFERENCE = re.compile(
    rf"(?<![A-Z0-9])SP[\s\-_.:#/]{{0,3}}((?:{_REF_CHAR}[\s\-]?){{7}}{_REF_CHAR})(?![A-Z0-9])"
)


@dataclass(frozen=True)
class ParsedLine:
    line_no: int  # the file's own line number (CSV) or the transaction's position (OFX)
    booked_on: date
    description: str
    amount_cents: int
    bank_id: str | None = None  # OFX's FITID, the bank's own id for the transaction


def find_references(description: str) -> list[str]:
    """Our payment references in a line's description, normalised to SP-XXXXXXXX."""
    found = []
    for match in REFERENCE.finditer(description.upper()):
        ref = "SP-" + re.sub(r"[\s\-]", "", match.group(1))
        if ref not in found:
            found.append(ref)
    return found


# Reading files -------------------------------------------------------------------------------


def parse_statement(
    data: bytes, filename: str, settings: Settings, fmt: str | None = None
) -> tuple[str, list[ParsedLine]]:
    """The lines of a CSV or OFX statement; InvalidRequest names the line that is wrong."""
    if not data.strip():
        raise InvalidRequest("the statement is empty")
    if len(data) > MAX_BYTES:
        raise InvalidRequest(f"the statement is larger than {MAX_BYTES // (1024 * 1024)} MB")
    if fmt is None:
        head = data.lstrip()[:200].upper()
        ofx = filename.lower().endswith((".ofx", ".qfx")) or head.startswith(
            (b"OFXHEADER", b"<OFX", b"<?XML")
        )
        fmt = "ofx" if ofx else "csv"
    if fmt == "ofx":
        return fmt, parse_ofx(data)
    if fmt == "csv":
        return fmt, parse_csv(data, settings)
    raise InvalidRequest(f"format must be csv or ofx, not {fmt!r}")


def _text(data: bytes) -> str:
    for encoding in ("utf-8-sig", "cp1252"):
        try:
            return codecs.decode(data, encoding)
        except UnicodeDecodeError:
            continue
    raise InvalidRequest("the statement is neither UTF-8 nor Windows-1252 text")


def _names(setting: str) -> list[str]:
    return [name.strip().lower() for name in setting.split(",") if name.strip()]


def parse_csv(data: bytes, settings: Settings) -> list[ParsedLine]:
    text = _text(data)
    if "\x00" in text:
        raise InvalidRequest("the statement holds NUL characters: it is not a CSV file")
    delimiter = settings.statement_delimiter or _delimiter(text, settings.statement_decimal_comma)
    reader = csv.reader(io.StringIO(text), delimiter=delimiter)
    wanted = [
        _names(settings.statement_date_columns),
        _names(settings.statement_description_columns),
        _names(settings.statement_amount_columns),
    ]
    formats = [f.strip() for f in settings.statement_date_formats.split(",") if f.strip()]
    positional = all(len(names) == 1 and names[0].isdigit() for names in wanted)
    columns = [int(names[0]) - 1 for names in wanted] if positional else None
    width = 0  # the header's number of columns (none without a header)
    lines: list[ParsedLine] = []
    try:
        for row in reader:
            n = reader.line_num
            cells = [cell.strip() for cell in row]
            while cells and not cells[-1]:  # trailing empty columns some exports add
                cells.pop()
            if not cells:
                continue
            if columns is None:
                columns, width = _header(cells, wanted), len(cells)
                if columns is None and n > 30:
                    break
                continue
            if width and len(cells) > width:
                raise InvalidRequest(
                    f"line {n}: {len(cells)} columns where the header has {width} "
                    "(an amount with an unquoted comma?)"
                )
            if len(cells) <= max(columns):
                raise InvalidRequest(
                    f"line {n}: expected at least {max(columns) + 1} columns, found {len(cells)}"
                )
            raw_date, description, raw_amount = (cells[i] for i in columns)
            booked_on = parse_date(raw_date, formats)
            if booked_on is None:
                raise InvalidRequest(
                    f"line {n}: cannot read the date {raw_date[:40]!r} "
                    f"(SKILLPAY_STATEMENT_DATE_FORMATS tries {', '.join(formats)})"
                )
            amount = parse_amount(raw_amount, settings.statement_decimal_comma)
            if amount is None:
                raise InvalidRequest(f"line {n}: cannot read the amount {raw_amount[:40]!r}")
            lines.append(ParsedLine(n, booked_on, description[:500], amount))
            if len(lines) > MAX_LINES:
                raise InvalidRequest(f"the statement has more than {MAX_LINES} lines")
    except csv.Error as exc:
        raise InvalidRequest(f"line {reader.line_num}: not valid CSV ({exc})") from exc
    if columns is None:
        raise InvalidRequest(
            "no header row naming a date, a description and an amount column in the first "
            "30 lines (looked for: "
            + "; ".join(" / ".join(names) for names in wanted)
            + "); set SKILLPAY_STATEMENT_*_COLUMNS to the names your bank uses, or to column "
            "numbers for a file without a header"
        )
    return lines


def _delimiter(text: str, decimal_comma: bool) -> str:
    """The delimiter most of the first lines use (a comma last when amounts use one)."""
    head = [line for line in text.splitlines()[:30] if line.strip()]
    candidates = ";\t|," if decimal_comma else ",;\t|"
    for candidate in candidates:
        if sum(1 for line in head if candidate in line) * 2 > len(head):
            return candidate
    return ","


def _header(cells: list[str], wanted: list[list[str]]) -> list[int] | None:
    """The positions of the wanted columns, if this row is the header naming them all."""
    lowered = [cell.lower() for cell in cells]
    positions = []
    for names in wanted:
        found = next((lowered.index(name) for name in names if name in lowered), None)
        if found is None:
            return None
        positions.append(found)
    return positions if len(set(positions)) == 3 else None


def parse_date(text: str, formats: Sequence[str]) -> date | None:
    for fmt in formats:
        try:
            return datetime.strptime(text.strip(), fmt).date()
        except ValueError:
            continue
    return None


def parse_amount(text: str, decimal_comma: bool = False) -> int | None:
    """Cents from a bank's amount: R 1,499.00, -250.00, 250.00-, (250.00), 250.00 DR,
    1 499,00 (decimal comma). None when it is not an amount."""
    s = text.strip().replace("\u00a0", " ").upper()
    negative = False
    if s.startswith("(") and s.endswith(")"):
        negative, s = True, s[1:-1].strip()
    for marker, sign in (("DR", True), ("CR", False)):
        if s.endswith(marker):
            negative, s = negative or sign, s[: -len(marker)].strip()
    if s.endswith("-"):
        negative, s = True, s[:-1].strip()
    if s.startswith(("-", "+")):
        negative, s = negative or s[0] == "-", s[1:].strip()
    for currency in ("ZAR", "R"):
        if s.startswith(currency):
            s = s[len(currency) :].strip()
    s = s.replace(" ", "").replace("'", "")
    s = s.replace(".", "").replace(",", ".") if decimal_comma else s.replace(",", "")
    if not re.fullmatch(r"\d{1,12}(\.\d{1,2})?", s):
        return None
    try:
        cents = int(Decimal(s) * 100)
    except InvalidOperation:
        return None
    return -cents if negative else cents


def parse_ofx(data: bytes) -> list[ParsedLine]:
    from ofxtools.Parser import OFXTree

    parser = OFXTree()
    try:
        parser.parse(io.BytesIO(data))
        ofx = parser.convert()
        lines = []
        for statement in ofx.statements:
            for position, txn in enumerate(statement.banktranlist or [], start=1):
                description = " ".join(str(x) for x in (txn.name, txn.memo) if x)
                lines.append(
                    ParsedLine(
                        position,
                        txn.dtposted.date(),
                        description[:500],
                        int(Decimal(txn.trnamt) * 100),
                        str(txn.fitid) if txn.fitid else None,
                    )
                )
    except Exception as exc:
        raise InvalidRequest(f"not a readable OFX statement: {str(exc)[:200]}") from exc
    if len(lines) > MAX_LINES:
        raise InvalidRequest(f"the statement has more than {MAX_LINES} lines")
    return lines


def fingerprints(lines: Sequence[ParsedLine]) -> list[str]:
    """The same transaction in two overlapping exports gets the same fingerprint: the bank's
    id when there is one, else date, amount, description and its occurrence among identical
    lines (two equal transfers on one day stay two)."""
    seen: Counter[tuple[date, int, str]] = Counter()
    result = []
    for line in lines:
        if line.bank_id:
            key = f"id|{line.bank_id}"
        else:
            text = " ".join(line.description.upper().split())
            triple = (line.booked_on, line.amount_cents, text)
            seen[triple] += 1
            key = f"{line.booked_on}|{line.amount_cents}|{text}|{seen[triple]}"
        result.append(hashlib.sha256(key.encode()).hexdigest())
    return result


# Matching and confirming ---------------------------------------------------------------------


@dataclass(frozen=True)
class Imported:
    statement: BankStatement
    created: bool  # False: this very file was imported before; nothing was imported again
    lines: list[StatementLine]


def import_statement(
    session: Session,
    settings: Settings,
    admin: User,
    data: bytes,
    filename: str,
    fmt: str | None = None,
) -> Imported:
    """Read the statement and store each new line with its proposed match. The caller commits."""
    digest = hashlib.sha256(data).hexdigest()
    earlier = session.scalar(select(BankStatement).where(BankStatement.sha256 == digest))
    if earlier is not None:
        return Imported(earlier, False, statement_lines(session, earlier.id))
    fmt, parsed = parse_statement(data, filename, settings, fmt)
    prints = fingerprints(parsed)
    known = set(
        session.scalars(
            select(StatementLine.fingerprint).where(StatementLine.fingerprint.in_(prints))
        )
    )
    fresh = [(line, fp) for line, fp in zip(parsed, prints, strict=True) if fp not in known]
    statement = BankStatement(
        sha256=digest,
        filename=(filename or "statement")[:200],
        format=fmt,
        imported_by=admin.id,
        line_count=len(parsed),
        already_imported=len(parsed) - len(fresh),
    )
    try:
        with session.begin_nested():
            session.add(statement)
            session.flush()
            rows = [
                StatementLine(
                    statement_id=statement.id,
                    line_no=line.line_no,
                    booked_on=line.booked_on,
                    description=line.description,
                    amount_cents=line.amount_cents,
                    fingerprint=fp,
                    **proposal,
                )
                for (line, fp), proposal in zip(
                    fresh, propose(session, [line for line, _ in fresh]), strict=True
                )
            ]
            session.add_all(rows)
            session.flush()
    except IntegrityError as exc:
        raise Conflict(
            "another import took the same lines or payments at the same moment; import again"
        ) from exc
    return Imported(statement, True, rows)


def propose(session: Session, lines: Sequence[ParsedLine]) -> list[dict[str, object]]:
    """What each line matches, and why: reference, enrollment_id, match, reason."""
    found_in = [find_references(line.description) for line in lines]
    refs = {ref for found in found_in for ref in found}
    by_ref = {
        p.reference: p
        for p in session.scalars(
            select(Payment)
            .where(Payment.reference.in_(refs))
            .options(joinedload(Payment.enrollment).joinedload(Enrollment.user))
        )
    }
    taken = set(
        session.scalars(
            select(StatementLine.enrollment_id).where(
                StatementLine.match == "exact",
                StatementLine.enrollment_id.in_([p.enrollment_id for p in by_ref.values()]),
            )
        )
    )
    waiting = waiting_transfers_by_amount(
        session, {line.amount_cents for line in lines if line.amount_cents > 0}
    )
    proposals: list[dict[str, object]] = []
    for line, found in zip(lines, found_in, strict=True):
        ref = found[0] if len(found) == 1 else None
        proposal = _propose(line, found, by_ref.get(ref) if ref else None, taken, waiting)
        proposals.append({"reference": ref, **proposal})
    return proposals


def _propose(
    line: ParsedLine,
    found: list[str],
    payment: Payment | None,
    taken: set[int | None],
    waiting: dict[int, list[int]],
) -> dict[str, object]:
    amount = rand(line.amount_cents)

    def proposal(match: str, reason: str, enrollment_id: int | None = None) -> dict[str, object]:
        return {"match": match, "reason": reason, "enrollment_id": enrollment_id}

    if line.amount_cents <= 0:
        return proposal("ignored", "money out of the account")
    if len(found) > 1:
        return proposal("unmatched", f"several references in one line: {', '.join(found)}")
    if found and payment is None:
        return proposal("unmatched", f"{found[0]} is not a payment reference of ours")
    if payment is not None:
        e = payment.enrollment
        if payment.method != PaymentMethod.EFT:
            return proposal(
                "not_waiting", f"{found[0]} is a card payment; iKhokha settles it", e.id
            )
        if e.id in taken:
            return proposal(
                "duplicate", f"enrollment {e.id} is matched by another line already", e.id
            )
        if e.state != State.PENDING_APPROVAL:
            return proposal("not_waiting", f"{found[0]}: enrollment {e.id} is {e.state}", e.id)
        if line.amount_cents != payment.amount_cents:
            return proposal(
                "amount_differs",
                f"{found[0]} is enrollment {e.id} ({e.user.email}): {amount} paid, "
                f"{rand(payment.amount_cents)} due",
                e.id,
            )
        taken.add(e.id)
        return proposal(
            "exact", f"{found[0]} and {amount} match enrollment {e.id} ({e.user.email})", e.id
        )
    candidates = [eid for eid in waiting.get(line.amount_cents, []) if eid not in taken]
    if len(candidates) == 1:
        return proposal(
            "amount_only",
            f"no reference; the only EFT enrollment waiting for {amount}: check the payer",
            candidates[0],
        )
    if candidates:
        return proposal(
            "amount_only", f"no reference; {len(candidates)} EFT enrollments wait for {amount}"
        )
    return proposal("unmatched", f"no reference, and no EFT enrollment waits for {amount}")


def waiting_transfers_by_amount(session: Session, amounts: set[int]) -> dict[int, list[int]]:
    """EFT enrollments waiting for approval, by the amount of their bank-transfer payment (an
    enrollment has one: EFT is chosen once, at checkout or at a retry after a failed card)."""
    if not amounts:
        return {}
    rows = session.execute(
        select(Payment.amount_cents, Enrollment.id)
        .join(Enrollment, Enrollment.id == Payment.enrollment_id)
        .where(
            Enrollment.state == State.PENDING_APPROVAL,
            Enrollment.payment_method == PaymentMethod.EFT,
            Payment.method == PaymentMethod.EFT,
            Payment.amount_cents.in_(amounts),
        )
        .order_by(Enrollment.id)
    )
    by_amount: dict[int, list[int]] = defaultdict(list)
    for amount, enrollment_id in rows:
        by_amount[amount].append(enrollment_id)
    return by_amount


@dataclass(frozen=True)
class Confirmed:
    job: BulkJob | None  # None when nothing was left to confirm
    line_ids: list[int]


def confirm_matches(
    session: Session,
    statement_id: int,
    admin: User,
    enqueue: Callable[[str], object],
    line_ids: Sequence[int] | None = None,
) -> Confirmed:
    """Approve the statement's exact matches (or those of line_ids that are exact) in one bulk
    job. A line is confirmed once: a second confirmation, or an admin confirming at the same
    moment, finds nothing left (the rows are claimed under their locks)."""
    if session.get(BankStatement, statement_id) is None:
        raise NotFound(f"bank statement {statement_id} does not exist")
    stmt = (
        update(StatementLine)
        .where(
            StatementLine.statement_id == statement_id,
            StatementLine.state == "proposed",
            StatementLine.match == "exact",
        )
        .values(state="confirmed", confirmed_by=admin.id, confirmed_at=utcnow())
        .returning(StatementLine.id, StatementLine.enrollment_id)
    )
    if line_ids is not None:
        stmt = stmt.where(StatementLine.id.in_(list(line_ids)))
    claimed = sorted(session.execute(stmt).all())
    if not claimed:
        return Confirmed(None, [])
    job, _ = bulk.create_job(session, admin, [eid for _, eid in claimed], None, enqueue)
    ids = [line_id for line_id, _ in claimed]
    session.execute(update(StatementLine).where(StatementLine.id.in_(ids)).values(job_id=job.id))
    return Confirmed(job, ids)


def statement_lines(
    session: Session, statement_id: int, match: str | None = None, limit: int = 10_000
) -> list[StatementLine]:
    stmt = select(StatementLine).where(StatementLine.statement_id == statement_id)
    if match:
        stmt = stmt.where(StatementLine.match == match)
    return list(
        session.scalars(stmt.order_by(StatementLine.line_no, StatementLine.id).limit(limit))
    )


def match_counts(session: Session, statement_ids: Sequence[int]) -> dict[int, dict[str, int]]:
    counts: dict[int, dict[str, int]] = {sid: {} for sid in statement_ids}
    for sid, match, state, n in session.execute(
        select(StatementLine.statement_id, StatementLine.match, StatementLine.state, func.count())
        .where(StatementLine.statement_id.in_(statement_ids))
        .group_by(StatementLine.statement_id, StatementLine.match, StatementLine.state)
    ):
        key = "confirmed" if state == "confirmed" else match
        counts[sid][key] = counts[sid].get(key, 0) + n
    return counts
