"""The proxy as one artifact: files/mlx_route_proxy packed into a zipapp.

`python proxy.pyz --help` runs it. The archive is byte-for-byte the same for
the same sources (fixed timestamps and order), so the deploy uploads and
restarts only when the code changed.
"""

from __future__ import annotations

import io
import zipfile
from pathlib import Path

PACKAGE = "mlx_route_proxy"
SOURCE = Path(__file__).resolve().parents[1] / "files" / PACKAGE
ARTIFACT = "proxy.pyz"  # its name on the host, in {route_home}/bin
MAIN = f"import sys\n\nfrom {PACKAGE}.cli import main\n\nsys.exit(main())\n".encode()


def build_zipapp() -> bytes:
    """The zipapp's bytes: a shebang line, then a zip of __main__.py and the package."""
    buf = io.BytesIO()
    buf.write(b"#!/usr/bin/env python3\n")
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as z:
        def add(name: str, data: bytes) -> None:
            info = zipfile.ZipInfo(name, date_time=(1980, 1, 1, 0, 0, 0))
            info.compress_type = zipfile.ZIP_DEFLATED
            info.external_attr = 0o644 << 16
            z.writestr(info, data)

        add("__main__.py", MAIN)
        for path in sorted(SOURCE.glob("*.py")):
            add(f"{PACKAGE}/{path.name}", path.read_bytes())
    return buf.getvalue()


def write_zipapp(dest: Path) -> Path:
    dest.write_bytes(build_zipapp())
    dest.chmod(0o755)
    return dest
