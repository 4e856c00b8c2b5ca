"""`make run`: the whole system on one machine with no external servers.

SQLite for the database; for the broker, unless CELERY_BROKER_URL is set, an embedded
Redis-protocol server (fakeredis, in this process) so that Flower and live notifications work
too. Then web, worker, beat, the iKhokha simulator and Flower, under honcho.
"""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
import threading
from pathlib import Path

PORTS = {"web": 8000, "stream": 8001, "simulator": 8010, "flower": 5555, "broker": 6390}


def start_embedded_broker(port: int) -> None:
    from fakeredis import TcpFakeServer

    server = TcpFakeServer(("127.0.0.1", port), server_type="redis")
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True, name="embedded-broker").start()


def main() -> None:
    env = dict(os.environ)
    var = Path(env.get("SKILLPAY_VAR_DIR", "var")).resolve()
    var.mkdir(exist_ok=True)
    env["SKILLPAY_VAR_DIR"] = str(var)
    port = int(env.get("PORT", PORTS["web"]))
    sim_port = int(env.get("SIMULATOR_PORT", PORTS["simulator"]))
    flower_port = int(env.get("FLOWER_PORT", PORTS["flower"]))
    stream_port = int(env.get("STREAM_PORT", PORTS["stream"]))
    env.setdefault("SKILLPAY_STREAM_URL", f"http://127.0.0.1:{stream_port}/api/events")
    env.setdefault("APP_ENV", "development")
    env.setdefault("PUBLIC_BASE_URL", f"http://127.0.0.1:{port}")
    env.setdefault("IKHOKHA_API_URL", f"http://127.0.0.1:{sim_port}")
    env.setdefault("SIMULATOR_PUBLIC_URL", f"http://127.0.0.1:{sim_port}")
    env.setdefault("SKILLPAY_FLOWER_URL", f"http://127.0.0.1:{flower_port}/")
    if not env.get("CELERY_BROKER_URL"):
        broker_port = int(env.get("SKILLPAY_EMBEDDED_BROKER_PORT", PORTS["broker"]))
        start_embedded_broker(broker_port)
        env["CELERY_BROKER_URL"] = f"redis://127.0.0.1:{broker_port}/0"
        env.setdefault("REDIS_URL", env["CELERY_BROKER_URL"])
    # Other terminals can load the same settings: set -a; . var/dev.env; set +a
    keys = (
        "APP_ENV",
        "DATABASE_URL",
        "CELERY_BROKER_URL",
        "REDIS_URL",
        "PUBLIC_BASE_URL",
        "IKHOKHA_API_URL",
        "SKILLPAY_VAR_DIR",
        "SKILLPAY_STREAM_URL",
        "SKILLPAY_FLOWER_URL",
    )
    (var / "dev.env").write_text(
        "".join(f"{k}={shlex.quote(env[k])}\n" for k in keys if env.get(k))
    )

    bin_dir = Path(sys.executable).parent
    skillpay = str(bin_dir / "skillpay")
    subprocess.run([skillpay, "db", "upgrade"], env=env, check=True)
    demo = subprocess.run([skillpay, "demo"], env=env, check=True, capture_output=True, text=True)
    tokens = json.loads(demo.stdout)

    from honcho.manager import Manager

    py = sys.executable
    schedule = var / "celerybeat-schedule"
    processes = {
        "web": f"{py} -m gunicorn web.wsgi:app -c python:web.gunicorn_conf "
        f"--bind 127.0.0.1:{port} --workers 2 --threads 4 --access-logfile -",
        "stream": f"{py} -m gunicorn web.stream:serve -c python:web.gunicorn_conf "
        f"--worker-class aiohttp.GunicornWebWorker --bind 127.0.0.1:{stream_port} --workers 1",
        "worker": f"{py} -m celery -A workers.app worker --loglevel INFO --concurrency 2",
        "beat": f"{py} -m celery -A workers.app beat --loglevel INFO --schedule {schedule}",
        "simulator": f"{py} -m gunicorn simulator.wsgi:app --bind 127.0.0.1:{sim_port} "
        "--workers 1 --threads 8",
        "flower": f"{py} -m celery -A workers.app flower --port={flower_port} --address=127.0.0.1",
    }
    manager = Manager()
    for name, cmd in processes.items():
        manager.add_process(name, cmd, env=env)
    print(
        f"""
Skillpay is starting (embedded defaults; data in {var}).
  Courses (student page)  http://127.0.0.1:{port}/
  Admin console           http://127.0.0.1:{port}/admin
  Live stream             http://127.0.0.1:{stream_port}/api/events
  iKhokha simulator       http://127.0.0.1:{sim_port}/
  Flower                  http://127.0.0.1:{flower_port}/
  Readiness               http://127.0.0.1:{port}/readyz

  Student token  {tokens["student_token"]}
  Admin token    {tokens["admin_token"]}

Other terminals: set -a; . {var}/dev.env; set +a   (then .venv/bin/skillpay ... works)
Ctrl-C stops everything.
""",
        flush=True,
    )
    manager.loop()
    sys.exit(manager.returncode)


if __name__ == "__main__":
    main()
