"""Python side of ampybus-proto's cross-language test.

Driven by ``crates/ampybus-proto/tests/cross_language.rs``; uses the
reference ``ampy-proto`` package.

``generate OUT``
    Writes OUT (JSON) with, for every message type of every ampy package, a
    deterministic fully populated message (``ampy_reflect.sample``) as
    ``payload_b64`` (``SerializeToString(deterministic=True)``) and ``json``
    (``json_format.MessageToDict(preserving_proto_field_name=True)``), plus
    every file's ``serialized_pb``.

``verify IN``
    Reads the Rust side's output: for every type, bytes encoded by the
    prost-generated type (``prost_b64``), by prost-reflect's DynamicMessage
    (``dynamic_b64``) and from Python's JSON (``from_json_b64``), plus
    Rust's JSON rendering (``json``). Checks each against the expected
    message, prints ``OK <fqdn>`` or ``FAIL <fqdn>: <why>`` per type and a
    final ``SUMMARY ok=<n> failed=<m>`` line; exits 1 on any failure.
"""

from __future__ import annotations

import base64
import json
import sys
from typing import Any

import google.protobuf
from google.protobuf import json_format
from google.protobuf.message import Message

import ampy_reflect


def to_json(msg: Message) -> dict[str, Any]:
    """The proto3 JSON form used on both sides (original field names)."""
    result: dict[str, Any] = json_format.MessageToDict(
        msg, preserving_proto_field_name=True
    )
    return result


def generate(out_path: str) -> None:
    """Writes the Python-built cases for the Rust side to ``out_path``."""
    cases = []
    for fqdn, _cls in ampy_reflect.message_classes():
        msg = ampy_reflect.sample(fqdn)
        cases.append(
            {
                "fqdn": fqdn,
                "payload_b64": base64.b64encode(
                    msg.SerializeToString(deterministic=True)
                ).decode("ascii"),
                "json": to_json(msg),
            }
        )
    files = {}
    for domain in ampy_reflect.DOMAINS:
        file_desc = ampy_reflect.module(domain).DESCRIPTOR
        files[file_desc.name] = base64.b64encode(file_desc.serialized_pb).decode(
            "ascii"
        )
    doc = {
        "ampy_proto_version": ampy_reflect.AMPY_PROTO_VERSION,
        "protobuf_version": google.protobuf.__version__,
        "cases": cases,
        "files": files,
    }
    with open(out_path, "w", encoding="utf-8") as out:
        json.dump(doc, out, indent=1, ensure_ascii=False)


def check_case(case: dict[str, Any]) -> list[str]:
    """Every mismatch between one Rust case and the expected message."""
    fqdn = case["fqdn"]
    cls = ampy_reflect.message_class(fqdn)
    expected = ampy_reflect.sample(fqdn)
    expected_bytes = expected.SerializeToString(deterministic=True)
    problems = []
    # Deterministic encodings must be byte-identical; DynamicMessage writes
    # map entries in hash order, so for it only message equality is exact.
    for key, exact_bytes in (
        ("prost_b64", True),
        ("from_json_b64", True),
        ("dynamic_b64", False),
    ):
        data = base64.b64decode(case[key])
        decoded = cls()
        decoded.ParseFromString(data)
        if decoded != expected:
            problems.append(f"{key}: decodes to a different message")
        if exact_bytes and data != expected_bytes:
            problems.append(f"{key}: bytes differ from deterministic Python bytes")
        # Catches unknown fields too, which equality might not see.
        if decoded.SerializeToString(deterministic=True) != expected_bytes:
            problems.append(f"{key}: re-serialises to different bytes")
    parsed = json_format.ParseDict(case["json"], cls())
    if parsed != expected:
        problems.append("json: Rust's JSON parses to a different message")
    if case["json"] != to_json(expected):
        problems.append("json: Rust's JSON differs from Python's JSON")
    return problems


def verify(in_path: str) -> int:
    """Checks the Rust side's output; returns the process exit code."""
    with open(in_path, encoding="utf-8") as src:
        doc = json.load(src)
    seen = {case["fqdn"] for case in doc["cases"]}
    ok = failed = 0
    for case in doc["cases"]:
        try:
            problems = check_case(case)
        except Exception as exc:  # report, never crash half-way
            problems = [f"exception: {exc!r}"]
        if problems:
            failed += 1
            print(f"FAIL {case['fqdn']}: {'; '.join(problems)}")
        else:
            ok += 1
            print(f"OK {case['fqdn']}")
    for fqdn, _cls in ampy_reflect.message_classes():
        if fqdn not in seen:
            failed += 1
            print(f"FAIL {fqdn}: missing from the Rust output")
    print(f"SUMMARY ok={ok} failed={failed}")
    return 1 if failed else 0


def main(argv: list[str]) -> int:
    if len(argv) != 3 or argv[1] not in ("generate", "verify"):
        print(f"usage: {argv[0]} generate|verify FILE", file=sys.stderr)
        return 2
    if argv[1] == "generate":
        generate(argv[2])
        return 0
    return verify(argv[2])


if __name__ == "__main__":
    sys.exit(main(sys.argv))
