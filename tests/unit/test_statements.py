"""Bank statements: reading CSV and OFX as banks export them, matching, importing, confirming."""

from __future__ import annotations

from dataclasses import replace
from datetime import date

import pytest
from sqlalchemy import func, select

from models import BulkJobItem, State, StatementLine
from pipeline.errors import InvalidRequest
from pipeline.statements import (
    confirm_matches,
    find_references,
    import_statement,
    parse_amount,
    parse_statement,
)
from tests.support import make_enrollment, make_user

# As FNB exports it: account lines before the header, day-first dates, no currency sign.
FNB = """\
ACC-NO,62000000000,Cheque Account
Opening Balance,1000.00
Date,Amount,Balance,Description
{rows}
"""


@pytest.mark.parametrize(
    ("text", "refs"),
    [
        ("SP-ABCDEFGH", ["SP-ABCDEFGH"]),
        ("payment sp abcd efgh thanks", ["SP-ABCDEFGH"]),
        ("SPABCDEFGH", ["SP-ABCDEFGH"]),
        ("FNB APP PAYMENT FROM J SMITH SP ABCD-EFGH", ["SP-ABCDEFGH"]),
        ("TRANSPABCDEFGH", []),  # inside a word
        ("SP-ABCDEFGHJ", []),  # one character too many
        ("SP-ABCD", []),
        ("SP-ABCDEFGH SP-ZZZZ2222", ["SP-ABCDEFGH", "SP-ZZZZ2222"]),
    ],
)
def test_references_are_found_however_they_are_typed(text, refs):
    assert find_references(text) == refs


@pytest.mark.parametrize(
    ("text", "comma", "cents"),
    [
        ("1499.00", False, 149900),
        ("R 1,499.00", False, 149900),
        ("-250.00", False, -25000),
        ("250.00-", False, -25000),
        ("(250.00)", False, -25000),
        ("250.00 DR", False, -25000),
        ("250.00 CR", False, 25000),
        ("1 499,00", True, 149900),
        ("1.499,5", True, 149950),
        ("12", False, 1200),
        ("", False, None),
        ("1.2.3", False, None),
        ("ten", False, None),
    ],
)
def test_amounts_are_read_as_south_african_banks_write_them(text, comma, cents):
    assert parse_amount(text, comma) == cents


def test_a_csv_with_a_preamble_and_its_own_column_order(settings):
    data = FNB.format(rows="2026/11/20,1499.00,2499.00,SP-ABCDEFGH\n2026/11/21,-50.00,2449.00,FEE")
    fmt, lines = parse_statement(data.encode(), "fnb.csv", settings)
    assert fmt == "csv"
    assert [(ln.line_no, ln.booked_on, ln.amount_cents, ln.description) for ln in lines] == [
        (4, date(2026, 11, 20), 149900, "SP-ABCDEFGH"),
        (5, date(2026, 11, 21), -5000, "FEE"),
    ]


def test_a_csv_without_a_header_by_column_numbers_and_decimal_commas(settings):
    settings = replace(
        settings,
        statement_date_columns="1",
        statement_description_columns="3",
        statement_amount_columns="2",
        statement_decimal_comma=True,
    )
    data = "20 Nov 2026;1 499,00;SP ABCD EFGH\n".encode("cp1252")
    _, lines = parse_statement(data, "x.csv", settings)
    assert (lines[0].booked_on, lines[0].amount_cents) == (date(2026, 11, 20), 149900)


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ("", "empty"),
        ("a,b,c\n1,2,3\n", "no header row naming a date, a description and an amount"),
        (
            "Date,Description,Amount\n2026/11/20,x,10.00\n31/31/2026,y,10.00\n",
            "line 3: cannot read the date",
        ),
        ("Date,Description,Amount\n2026/11/20,x,ten rand\n", "line 2: cannot read the amount"),
        ("Date,Description,Amount\n2026/11/20,x\n", "line 2: expected at least 3 columns"),
        ("Date,Description,Amount\n2026/11/20,x,4,99\n", "line 2: 4 columns where the header"),
        ("Date,Description,Amount\n2026/11/20,\x00,1\n", "NUL"),
    ],
)
def test_bad_files_get_an_error_naming_the_line(settings, body, message):
    with pytest.raises(InvalidRequest, match=message):
        parse_statement(body.encode(), "bad.csv", settings)


OFX = """OFXHEADER:100
DATA:OFXSGML
VERSION:102
SECURITY:NONE
ENCODING:USASCII
CHARSET:1252
COMPRESSION:NONE
OLDFILEUID:NONE
NEWFILEUID:NONE

<OFX><SIGNONMSGSRSV1><SONRS><STATUS><CODE>0<SEVERITY>INFO</STATUS><DTSERVER>20261122
<LANGUAGE>ENG</SONRS></SIGNONMSGSRSV1><BANKMSGSRSV1><STMTTRNRS><TRNUID>1<STATUS><CODE>0
<SEVERITY>INFO</STATUS><STMTRS><CURDEF>ZAR<BANKACCTFROM><BANKID>250655<ACCTID>62000000000
<ACCTTYPE>CHECKING</BANKACCTFROM><BANKTRANLIST><DTSTART>20261101<DTEND>20261122
<STMTTRN><TRNTYPE>CREDIT<DTPOSTED>20261120<TRNAMT>1499.00<FITID>A1<NAME>J SMITH
<MEMO>SP-ABCDEFGH</STMTTRN>
<STMTTRN><TRNTYPE>DEBIT<DTPOSTED>20261121<TRNAMT>-50.00<FITID>A2<NAME>BANK FEE</STMTTRN>
</BANKTRANLIST><LEDGERBAL><BALAMT>1449.00<DTASOF>20261122</LEDGERBAL></STMTRS></STMTTRNRS>
</BANKMSGSRSV1></OFX>
"""


def test_an_ofx_statement_is_read_with_the_banks_own_ids(settings):
    fmt, lines = parse_statement(OFX.encode(), "nov.ofx", settings)
    assert fmt == "ofx"
    assert [(ln.booked_on, ln.amount_cents, ln.bank_id) for ln in lines] == [
        (date(2026, 11, 20), 149900, "A1"),
        (date(2026, 11, 21), -5000, "A2"),
    ]
    assert "SP-ABCDEFGH" in lines[0].description
    with pytest.raises(InvalidRequest, match="not a readable OFX statement"):
        parse_statement(b"OFXHEADER:100\n<OFX><nonsense", "bad.ofx", settings)


def waiting_transfer(session, amount_cents):
    enrollment, payment = make_enrollment(
        session, method="eft", state=State.PENDING_APPROVAL, amount_cents=amount_cents
    )
    return enrollment, payment


def csv_of(*rows):
    return ("Date,Description,Amount\n" + "\n".join(",".join(r) for r in rows) + "\n").encode()


def test_each_line_is_matched_with_its_reason(session, settings):
    admin = make_user(session, role="admin")[0]
    exact, exact_pay = waiting_transfer(session, 149900)
    short, short_pay = waiting_transfer(session, 99900)
    alone, _ = waiting_transfer(session, 123400)
    approved, approved_pay = make_enrollment(
        session, method="eft", state=State.APPROVED, amount_cents=5000
    )
    card, card_pay = make_enrollment(session, method="card", state=State.PENDING_PAYMENT)
    data = csv_of(
        ("2026/11/20", f"EFT {exact_pay.reference.lower().replace('-', ' ')}", "1499.00"),
        ("2026/11/20", f"EFT {short_pay.reference}", "900.00"),
        ("2026/11/20", "NO REF J SMITH", "1234.00"),
        ("2026/11/20", f"{approved_pay.reference}", "50.00"),
        ("2026/11/20", f"{card_pay.reference}", "1.00"),
        ("2026/11/20", "SP-ZZZZZZZZ", "10.00"),
        ("2026/11/20", "SOMEONE", "77.00"),
        ("2026/11/20", "BANK FEE", "-5.00"),
        ("2026/11/21", f"again {exact_pay.reference}", "1499.00"),
    )
    imported = import_statement(session, settings, admin, data, "nov.csv")
    got = [(ln.match, ln.enrollment_id) for ln in imported.lines]
    assert got == [
        ("exact", exact.id),
        ("amount_differs", short.id),
        ("amount_only", alone.id),
        ("not_waiting", approved.id),
        ("not_waiting", card.id),
        ("unmatched", None),
        ("unmatched", None),
        ("ignored", None),
        ("duplicate", exact.id),  # a line matches one enrollment at most, and vice versa
    ]
    reasons = [ln.reason for ln in imported.lines]
    assert "R 900.00 paid, R 999.00 due" in reasons[1]
    assert "the only EFT enrollment waiting for R 1,234.00" in reasons[2]
    assert "is approved" in reasons[3] and "card payment" in reasons[4]
    assert "not a payment reference of ours" in reasons[5]


def test_importing_twice_imports_nothing_and_overlaps_are_skipped(session, settings):
    admin = make_user(session, role="admin")[0]
    _, pay = waiting_transfer(session, 1000)
    first = csv_of(("2026/11/20", pay.reference, "10.00"), ("2026/11/20", "X", "3.00"))
    one = import_statement(session, settings, admin, first, "a.csv")
    again = import_statement(session, settings, admin, first, "a-again.csv")
    assert not again.created and again.statement.id == one.statement.id
    overlapping = csv_of(
        ("2026/11/20", pay.reference, "10.00"),
        ("2026/11/20", "X", "3.00"),
        ("2026/11/20", "X", "3.00"),  # a second, equal transfer the same day is a new line
    )
    two = import_statement(session, settings, admin, overlapping, "b.csv")
    assert two.created and two.statement.already_imported == 2 and len(two.lines) == 1
    assert session.scalar(select(func.count()).select_from(StatementLine)) == 3


def test_exact_matches_are_confirmed_once_as_one_bulk_job(session, settings):
    admin, other = make_user(session, role="admin")[0], make_user(session, role="admin")[0]
    a, pay_a = waiting_transfer(session, 1000)
    b, pay_b = waiting_transfer(session, 2000)
    data = csv_of(
        ("2026/11/20", pay_a.reference, "10.00"),
        ("2026/11/20", pay_b.reference, "20.00"),
        ("2026/11/20", "nothing", "30.00"),
    )
    statement = import_statement(session, settings, admin, data, "n.csv").statement
    enqueued: list[str] = []
    confirmed = confirm_matches(session, statement.id, admin, enqueued.append)
    assert confirmed.job is not None and confirmed.job.total == 2
    items = session.scalars(
        select(BulkJobItem.enrollment_id).where(BulkJobItem.job_id == confirmed.job.id)
    ).all()
    assert sorted(items) == sorted([a.id, b.id])
    assert confirm_matches(session, statement.id, other, enqueued.append).job is None
    lines = session.scalars(select(StatementLine).where(StatementLine.state == "confirmed")).all()
    assert {(ln.confirmed_by, ln.job_id) for ln in lines} == {(admin.id, confirmed.job.id)}
