"""TEMPORARY stand-in until the classifier branch lands."""

from __future__ import annotations

from dataclasses import dataclass

from pgtls_twisted.protocol._txstate import quoteLiteral


@dataclass(frozen=True)
class Verdict:
    pin: str | None = None
    deallocates: bool = False


def classify(sql: str) -> Verdict:
    low = " ".join(sql.lower().split())
    if low.startswith("set ") and not low.startswith("set local"):
        return Verdict(pin="SET " + low.split()[1])
    if low.startswith("listen"):
        return Verdict(pin="LISTEN")
    if "create temp" in low:
        return Verdict(pin="CREATE TEMPORARY TABLE")
    if "pg_advisory_lock(" in low:
        return Verdict(pin="pg_advisory_lock")
    if low.startswith("discard all") or low.startswith("deallocate all"):
        return Verdict(deallocates=True)
    return Verdict()


def refusal(reason: str) -> str:
    msg = quoteLiteral(f"pgtls: {reason} would pin the client")
    return f"DO $pgtls$ BEGIN RAISE EXCEPTION USING ERRCODE = '0A000', MESSAGE = {msg}; END $pgtls$"
