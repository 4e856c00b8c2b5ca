"""The receiver's baseline: a bare Flask endpoint that returns 200."""

from flask import Flask

app = Flask(__name__)


@app.post("/webhooks/ikhokha")
def bare():
    return {"ok": True}, 200
