"""Privacy: case ids from a user mapping or a salted hash (never from a name, a PatientID or a folder name); a private
key file the user keeps apart from the data set; scrubbing of every logged string; and an audit that searches the
written data set for identifying values (file names, text files, NIfTI headers, PNG text chunks).

The key file holds the linkage (source key -> pseudonym, salt): it lies outside the output folder, by default next
to it as ``<out>.private_ids.json``, and must not be shared with the data.
"""

from __future__ import annotations

import csv
import gzip
import hashlib
import hmac
import json
import re
import secrets
import struct
import zlib
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from liverfusion.errors import ConfigError, DataError
from liverfusion.utils.atomic import atomic_write_text

MODES = ("hash", "mapping", "keep")
SAFE_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]*$")
TEXT_SUFFIXES = {".csv", ".json", ".txt", ".yaml", ".yml", ".log", ".md", ".tsv"}


def sanitize_id(text: str) -> str:
    out = re.sub(r"[^A-Za-z0-9_.\-]", "_", str(text).strip()).lstrip("._-")
    return out or "case"


class Pseudonymizer:
    """Source patient key -> output patient id, by ``mode``: ``hash`` (HMAC-SHA256 with a secret salt),
    ``mapping`` (a CSV with columns source,pseudonym that the user controls) or ``keep`` (data that is already
    pseudonymous, e.g. LLD-MMRI MR numbers or TCGA barcodes)."""

    def __init__(
        self,
        mode: str,
        key_file: Path,
        prefix: str = "",
        length: int = 10,
        salt: str | None = None,
        mapping_csv: str | Path | None = None,
    ):
        if mode not in MODES:
            raise ConfigError(f"privacy.ids must be one of {MODES}, not {mode!r}")
        if prefix and not SAFE_ID.match(prefix):
            raise ConfigError(f"privacy.prefix {prefix!r} must be letters, digits, '_', '.' or '-'")
        if not 6 <= int(length) <= 64:
            raise ConfigError("privacy.hash_length must be between 6 and 64 hex digits")
        self.mode, self.key_file, self.prefix, self.length = mode, Path(key_file), prefix, int(length)
        previous = self._read_key_file()
        self.salt = salt or previous.get("salt") or (secrets.token_hex(16) if mode == "hash" else None)
        self.table: dict[str, str] = {}
        self.unmapped: set[str] = set()
        self.mapping: dict[str, str] = {}
        if mode == "mapping":
            if not mapping_csv:
                raise ConfigError("privacy.ids=mapping needs privacy.mapping_csv (columns: source,pseudonym)")
            self.mapping = self._read_mapping(Path(mapping_csv))

    def _read_key_file(self) -> dict[str, Any]:
        if not self.key_file.is_file():
            return {}
        try:
            data = json.loads(self.key_file.read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise DataError(f"unreadable private key file ({exc})", path=self.key_file) from None
        if data.get("mode") not in (None, self.mode):
            raise ConfigError(
                f"the key file {self.key_file} was made with privacy.ids={data.get('mode')}; "
                f"use that mode or another privacy.key_file"
            )
        return data

    @staticmethod
    def _read_mapping(path: Path) -> dict[str, str]:
        if not path.is_file():
            raise DataError("privacy.mapping_csv is missing", path=path)
        with path.open(newline="") as fh:
            rows = list(csv.DictReader(fh))
        if not rows or "source" not in rows[0] or "pseudonym" not in rows[0]:
            raise DataError("the id mapping needs columns 'source' and 'pseudonym'", path=path)
        out: dict[str, str] = {}
        for row in rows:
            src, pseud = str(row["source"]).strip(), str(row["pseudonym"]).strip()
            if not SAFE_ID.match(pseud):
                raise DataError(
                    f"pseudonym {pseud!r} is not a safe file name (letters, digits, _ . -)", path=path
                )
            out[src] = pseud
        if len(set(out.values())) != len(out):
            raise DataError("the id mapping gives one pseudonym to several sources", path=path)
        return out

    def patient_id(self, key: str) -> str:
        """The output patient id; raises DataError (without the key in the message) when unmapped."""
        if key in self.table:
            return self.table[key]
        if self.mode == "keep":
            pid = self.prefix + sanitize_id(key)
        elif self.mode == "mapping":
            if key not in self.mapping:
                self.unmapped.add(key)
                raise DataError(
                    f"patient has no entry in privacy.mapping_csv (listed under 'unmapped' in {self.key_file})"
                )
            pid = self.prefix + self.mapping[key]
        else:
            digest = hmac.new(str(self.salt).encode(), key.encode(), hashlib.sha256).hexdigest()
            pid = self.prefix + digest[: self.length]
        clash = [k for k, v in self.table.items() if v == pid]
        if clash:
            raise ConfigError(
                f"two patients get the id {pid!r}: raise privacy.hash_length or fix the mapping"
            )
        self.table[key] = pid
        return pid

    def save(self) -> Path:
        data = {
            "warning": "PRIVATE: links pseudonyms to source identifiers. Keep apart from the prepared data.",
            "mode": self.mode,
            "prefix": self.prefix,
            "salt": self.salt,
            "patients": dict(sorted(self.table.items())),
            "unmapped": sorted(self.unmapped),
        }
        if self.key_file.is_file():
            old = self._read_key_file()
            data["patients"] = {**old.get("patients", {}), **data["patients"]}
        return atomic_write_text(self.key_file, json.dumps(data, indent=1))


class Scrubber:
    """Replaces known identifying values in free text (reasons, series descriptions) before it is logged."""

    def __init__(self, values: Iterable[str], min_length: int, token: str = "<redacted>"):
        self.min_length = min_length
        self.token = token
        self.values: set[str] = set()
        self._regex: re.Pattern[str] | None = None
        self.add(values)

    def add(self, values: Iterable[str]) -> None:
        new = {str(v) for v in values if v is not None and len(str(v)) >= self.min_length}
        if new - self.values:
            self.values |= new
            self._regex = None

    def remove(self, values: Iterable[str]) -> None:
        self.values -= set(values)
        self._regex = None

    def pattern(self) -> re.Pattern[str] | None:
        if self._regex is None and self.values:
            ordered = sorted(self.values, key=len, reverse=True)
            self._regex = re.compile("|".join(re.escape(v) for v in ordered))
        return self._regex

    def __call__(self, text: Any) -> Any:
        if not isinstance(text, str):
            return text
        rx = self.pattern()
        return rx.sub(self.token, text) if rx else text

    def deep(self, obj: Any) -> Any:
        """Scrub every string (keys and values) in a JSON-like structure."""
        if isinstance(obj, str):
            return self(obj)
        if isinstance(obj, dict):
            return {self(k): self.deep(v) for k, v in obj.items()}
        if isinstance(obj, list | tuple):
            return [self.deep(v) for v in obj]
        return obj


def nifti_header_bytes(path: Path) -> bytes:
    """The header and extensions of a .nii/.nii.gz file (everything before the voxels), decompressed."""
    opener = gzip.open if path.name.endswith(".gz") else open
    with opener(path, "rb") as fh:  # type: ignore[operator]
        head = fh.read(352)
        if len(head) < 348:
            return head
        endian = "<" if struct.unpack("<i", head[:4])[0] == 348 else ">"
        vox_offset = int(struct.unpack(endian + "f", head[108:112])[0])
        rest = fh.read(max(0, vox_offset - 352)) if vox_offset > 352 else b""
    return head + rest


def nifti_text_fields(path: Path) -> dict[str, str]:
    """descrip, aux_file, intent_name and db_name of a NIfTI-1 header (all must stay free of identifiers)."""
    h = nifti_header_bytes(path)
    fields = {"db_name": (4, 14), "descrip": (148, 228), "aux_file": (228, 252), "intent_name": (328, 344)}
    return {k: h[a:b].split(b"\x00")[0].decode("latin-1") for k, (a, b) in fields.items()}


def png_text(path: Path) -> bytes:
    """Concatenated tEXt/iTXt/zTXt chunk payloads of a PNG (the only place a PNG carries text)."""
    data = path.read_bytes()
    out = []
    pos = 8
    while pos + 8 <= len(data):
        (length,) = struct.unpack(">I", data[pos : pos + 4])
        kind = data[pos + 4 : pos + 8]
        body = data[pos + 8 : pos + 8 + length]
        if kind in (b"tEXt", b"iTXt"):
            out.append(body)
        elif kind == b"zTXt":
            key, _, rest = body.partition(b"\x00")
            try:
                out.append(key + b"\x00" + zlib.decompress(rest[1:]))
            except zlib.error:
                out.append(body)
        pos += 12 + length
    return b"\n".join(out)


def searchable_bytes(path: Path) -> bytes:
    name = path.name.lower()
    if name.endswith((".nii", ".nii.gz")):
        return nifti_header_bytes(path)
    if name.endswith(".png"):
        return png_text(path)
    return path.read_bytes()


def audit_outputs(root: Path, values: Iterable[str]) -> dict[str, Any]:
    """Search file names, text files, NIfTI headers and PNG text under ``root`` for the identifying values.

    Voxel data is not searched here (binary noise could match short strings); the test suite searches it too.
    Returns counts and the relative paths of offending files, never the values themselves.
    """
    vals = sorted({v for v in values if v}, key=len, reverse=True)
    result: dict[str, Any] = {"files_checked": 0, "values_checked": len(vals), "hits": []}
    if not vals:
        return result
    rx = re.compile(b"|".join(re.escape(v.encode("utf-8")) for v in vals))
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        rel = path.relative_to(root).as_posix()
        result["files_checked"] += 1
        try:
            blob = rel.encode("utf-8") + b"\n" + searchable_bytes(path)
        except (OSError, EOFError, zlib.error) as exc:
            result["hits"].append(f"{rel} (unreadable: {type(exc).__name__})")
            continue
        if rx.search(blob):
            result["hits"].append(rel)
    return result
