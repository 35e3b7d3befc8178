#!/usr/bin/env python3
"""Runs the ClipProcessor health.lua (examples/argocd/resource_customizations/) on a ClipProcessor the way Argo CD does: the live object as
the global `obj`, the script's returned table as the health.

    python3 tests/argocd/health.py [--lua lua5.1] < processor.json   ->  "<status>\\n<message>"
"""
import argparse
import json
import pathlib
import subprocess
import sys

CHECK_DIR = (pathlib.Path(__file__).resolve().parents[2]
             / "examples/argocd/resource_customizations/lakechain.dev/ClipProcessor")
SCRIPT = CHECK_DIR / "health.lua"


def to_lua(v) -> str:
    """A JSON value as a Lua expression (objects and arrays as tables, null as nil)."""
    if v is None:
        return "nil"
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    if isinstance(v, str):
        # Lua 5.1 string literal: printable ASCII as is, every other byte as a 3-digit escape.
        raw = v.encode("utf-8")
        return '"' + "".join(
            chr(b) if (chr(b).isascii() and chr(b).isalnum()) or chr(b) in " .,:;-_/()" else f"\\{b:03d}"
            for b in raw
        ) + '"'
    if isinstance(v, list):
        return "{" + ", ".join(to_lua(x) for x in v) + "}"
    if isinstance(v, dict):
        return "{" + ", ".join(f"[{to_lua(k)}] = {to_lua(x)}" for k, x in v.items()) + "}"
    raise TypeError(type(v))


def health(obj: dict, lua: str = "lua5.4") -> tuple[str, str]:
    program = (
        f"obj = {to_lua(obj)}\n"
        f"local hs = dofile({to_lua(str(SCRIPT))})\n"
        'io.write(hs.status, "\\n", hs.message)\n'
    )
    out = subprocess.run([lua, "-"], input=program.encode(), capture_output=True, check=False)
    if out.returncode != 0:
        raise RuntimeError(f"{lua} failed: {out.stderr.decode()}")
    status, _, message = out.stdout.decode().partition("\n")
    return status, message


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--lua", default="lua5.4")
    status, message = health(json.load(sys.stdin), ap.parse_args().lua)
    print(status)
    print(message)
