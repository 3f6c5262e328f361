#!/usr/bin/env python3
"""Writes the seed corpus fuzz/seeds/<target>/ from the golden frames in
crates/iso8583/tests/fixtures/<dialect>/*.hex (run from anywhere).

Each golden frame gives two seeds: `<name>.framed` (the 2-byte length prefix
and the frame, as the frame decoder reads it) and `<name>.bare` (the frame
alone, as Message::parse reads it). One more seed per dialect, `stream.framed`,
is a keep-alive followed by two frames back to back."""

import pathlib

root = pathlib.Path(__file__).resolve().parent
fixtures = root.parent / "crates" / "iso8583" / "tests" / "fixtures"

for target, dialect in [("cup_pos", "cup-pos"), ("iso87", "iso87")]:
    out = root / "seeds" / target
    out.mkdir(parents=True, exist_ok=True)
    for old in out.iterdir():
        old.unlink()
    frames = []
    for hex_path in sorted((fixtures / dialect).glob("*.hex")):
        wire = bytes.fromhex(hex_path.read_text().strip())
        assert int.from_bytes(wire[:2], "big") == len(wire) - 2, hex_path
        name = hex_path.stem
        (out / f"{name}.framed").write_bytes(wire)
        (out / f"{name}.bare").write_bytes(wire[2:])
        frames.append(wire)
    (out / "stream.framed").write_bytes(b"\x00\x00" + frames[0] + frames[-1])
    print(f"{out.relative_to(root.parent)}: {2 * len(frames) + 1} seeds")
