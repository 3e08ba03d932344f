#!/usr/bin/env python3
"""Builds OCI image archives from files on this machine, without a container engine.

    images/oci.py --name REF (--out FILE | --rootfs DIR) [--bin PATH[:DEST]]... [--file SRC:DEST[:MODE]]...
                  [--entrypoint JSON] [--label K=V]... [--user UID:GID] [--env K=V]...

An image is two layers: a base (CA certificates, /etc/passwd and /etc/group with `nonroot`
65532, /tmp, and every shared library the binaries need as `ldd` lists them, the dynamic
loader included) and the binaries themselves. Everything is reproducible: entries are sorted,
owned by 0:0, dated SOURCE_DATE_EPOCH (default 0), gzip headers carry no name or time, so
the same inputs give the same layer, config and manifest digests on every build.

The archive is an OCI image layout (oci-layout, index.json, blobs/sha256/...) that also
carries Docker's manifest.json, so `ctr images import`, `skopeo copy oci-archive:FILE ...`,
`podman load -i FILE` and `docker load -i FILE` all accept it. index.json names the image
with `io.containerd.image.name` (the full reference) and `org.opencontainers.image.ref.name`
(its tag).

Prints the manifest digest on stdout. Used by images/build (the product's images) and by the
e2e node service (test images from Debian's binaries).
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import io
import json
import os
import re
import subprocess
import sys
import tarfile
import time
from dataclasses import dataclass, field

NONROOT = 65532
CA_BUNDLE = "/etc/ssl/certs/ca-certificates.crt"


@dataclass
class Entry:
    """One file of a layer: its content, or None for a directory."""

    path: str  # absolute, inside the image
    data: bytes | None
    mode: int
    link: str | None = None  # a symbolic link to this target


@dataclass
class Layer:
    entries: dict[str, Entry] = field(default_factory=dict)

    def add_dirs(self, path: str) -> None:
        parts = path.strip("/").split("/")[:-1]
        for i in range(1, len(parts) + 1):
            d = "/" + "/".join(parts[:i])
            self.entries.setdefault(d, Entry(d, None, 0o755))

    def add_file(self, path: str, data: bytes, mode: int) -> None:
        self.add_dirs(path)
        self.entries[path] = Entry(path, data, mode)

    def add_symlink(self, path: str, target: str) -> None:
        self.add_dirs(path)
        self.entries[path] = Entry(path, None, 0o777, target)

    def add_dir(self, path: str, mode: int) -> None:
        self.add_dirs(path)
        self.entries[path] = Entry(path, None, mode)

    def write_to(self, root: str) -> None:
        """The same files as a directory tree (for a Dockerfile's `COPY --from`)."""
        for path in sorted(self.entries):
            e = self.entries[path]
            dest = os.path.join(root, path.lstrip("/"))
            if e.link is not None:
                if os.path.lexists(dest):
                    os.remove(dest)
                os.symlink(e.link, dest)
            elif e.data is None:
                os.makedirs(dest, exist_ok=True)
                os.chmod(dest, e.mode)
            else:
                with open(dest, "wb") as f:
                    f.write(e.data)
                os.chmod(dest, e.mode)

    def tar(self, epoch: int) -> bytes:
        buf = io.BytesIO()
        with tarfile.open(fileobj=buf, mode="w", format=tarfile.GNU_FORMAT) as tar:
            for path in sorted(self.entries):
                e = self.entries[path]
                info = tarfile.TarInfo(path.lstrip("/"))
                info.mtime = epoch
                info.uid = info.gid = 0
                info.uname = info.gname = ""
                info.mode = e.mode
                if e.link is not None:
                    info.type = tarfile.SYMTYPE
                    info.linkname = e.link
                    tar.addfile(info)
                elif e.data is None:
                    info.type = tarfile.DIRTYPE
                    tar.addfile(info)
                else:
                    info.size = len(e.data)
                    tar.addfile(info, io.BytesIO(e.data))
        return buf.getvalue()


def gz(data: bytes) -> bytes:
    # mtime=0 and no file name: the gzip header is the same on every build.
    buf = io.BytesIO()
    with gzip.GzipFile(filename="", mode="wb", fileobj=buf, mtime=0, compresslevel=9) as f:
        f.write(data)
    return buf.getvalue()


def sha256(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def shared_libraries(binary: str) -> list[str]:
    """The absolute paths `ldd` lists for a dynamically linked binary (none for a static one)."""
    out = subprocess.run(["ldd", binary], capture_output=True, text=True)
    if out.returncode != 0:
        text = (out.stdout + out.stderr).strip()
        if "not a dynamic executable" in text or "statically linked" in text:
            return []
        raise SystemExit(f"images/oci.py: ldd {binary} failed: {text}")
    libs = []
    for line in out.stdout.splitlines():
        if "not found" in line:
            raise SystemExit(f"images/oci.py: {binary} needs a library that is missing: {line.strip()}")
        m = re.search(r"(/\S+) \(0x", line)
        if m:
            libs.append(m.group(1))
    return libs


def read(path: str) -> bytes:
    with open(os.path.realpath(path), "rb") as f:
        return f.read()


def base_layer(binaries: list[str]) -> Layer:
    layer = Layer()
    layer.add_file(CA_BUNDLE, read(CA_BUNDLE), 0o644)
    layer.add_file(
        "/etc/passwd",
        f"root:x:0:0:root:/root:/sbin/nologin\nnonroot:x:{NONROOT}:{NONROOT}:nonroot:/home/nonroot:/sbin/nologin\n".encode(),
        0o644,
    )
    layer.add_file("/etc/group", f"root:x:0:\nnonroot:x:{NONROOT}:\n".encode(), 0o644)
    layer.add_dir("/tmp", 0o1777)
    layer.add_dir("/home/nonroot", 0o755)
    for lib in sorted({lib for b in binaries for lib in shared_libraries(b)}):
        # The real file at the path the loader asks for (no symlinks to follow in the image).
        layer.add_file(lib, read(lib), 0o755)
    return layer


def build(args: argparse.Namespace) -> str:
    epoch = int(os.environ.get("SOURCE_DATE_EPOCH", "0"))
    bins: list[tuple[str, str]] = []
    for spec in args.bin:
        src, _, dest = spec.partition(":")
        bins.append((src, dest or "/usr/local/bin/" + os.path.basename(src)))
    files: list[tuple[str, str, int]] = []
    for spec in args.file:
        parts = spec.split(":")
        if len(parts) not in (2, 3):
            raise SystemExit(f"images/oci.py: --file wants SRC:DEST[:MODE], got {spec}")
        files.append((parts[0], parts[1], int(parts[2], 8) if len(parts) == 3 else 0o644))
    for src, _ in bins:
        if not os.access(src, os.X_OK):
            raise SystemExit(f"images/oci.py: {src} is not an executable file")

    layers = [base_layer([src for src, _ in bins])]
    top = Layer()
    for src, dest in bins:
        top.add_file(dest, read(src), 0o755)
    for src, dest, mode in files:
        top.add_file(dest, read(src), mode)
    for link in args.link:
        target, _, dest = link.partition(":")
        top.add_symlink(dest, target)
    layers.append(top)
    if args.rootfs:
        for layer in layers:
            layer.write_to(args.rootfs)
        print(f"images/oci.py: the files of {args.name} -> {args.rootfs}", file=sys.stderr)
        return ""

    blobs: dict[str, bytes] = {}
    diff_ids, descriptors = [], []
    for layer in layers:
        raw = layer.tar(epoch)
        packed = gz(raw)
        digest = sha256(packed)
        blobs[digest] = packed
        diff_ids.append(sha256(raw))
        descriptors.append(
            {"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip", "digest": digest, "size": len(packed)}
        )

    created = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(epoch))
    labels = dict(kv.split("=", 1) for kv in args.label)
    env = ["PATH=/usr/local/bin:/usr/bin:/bin", "SSL_CERT_FILE=" + CA_BUNDLE] + args.env
    config = {
        "created": created,
        "architecture": "amd64",
        "os": "linux",
        "config": {
            "User": args.user,
            "Env": env,
            "Entrypoint": json.loads(args.entrypoint) if args.entrypoint else [bins[0][1]],
            "WorkingDir": "/",
            "Labels": labels,
        },
        "rootfs": {"type": "layers", "diff_ids": diff_ids},
        "history": [{"created": created, "created_by": "images/oci.py"} for _ in layers],
    }
    config_bytes = canonical(config)
    config_digest = sha256(config_bytes)
    blobs[config_digest] = config_bytes
    manifest = {
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": config_digest, "size": len(config_bytes)},
        "layers": descriptors,
        "annotations": {k: v for k, v in labels.items() if k.startswith("org.opencontainers.image.")},
    }
    manifest_bytes = canonical(manifest)
    manifest_digest = sha256(manifest_bytes)
    blobs[manifest_digest] = manifest_bytes

    tag = args.name.rsplit(":", 1)[1] if ":" in args.name.rsplit("/", 1)[-1] else "latest"
    index = {
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.index.v1+json",
        "manifests": [
            {
                "mediaType": "application/vnd.oci.image.manifest.v1+json",
                "digest": manifest_digest,
                "size": len(manifest_bytes),
                "annotations": {"io.containerd.image.name": args.name, "org.opencontainers.image.ref.name": tag},
                "platform": {"architecture": "amd64", "os": "linux"},
            }
        ],
    }
    docker_manifest = [
        {
            "Config": "blobs/sha256/" + config_digest.split(":")[1],
            "RepoTags": [args.name],
            "Layers": ["blobs/sha256/" + d["digest"].split(":")[1] for d in descriptors],
        }
    ]

    archive = Layer()
    archive.add_file("/oci-layout", canonical({"imageLayoutVersion": "1.0.0"}), 0o644)
    archive.add_file("/index.json", canonical(index), 0o644)
    archive.add_file("/manifest.json", canonical(docker_manifest), 0o644)
    for digest, data in blobs.items():
        archive.add_file("/blobs/sha256/" + digest.split(":")[1], data, 0o644)
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    tmp = args.out + ".tmp"
    with open(tmp, "wb") as f:
        f.write(archive.tar(epoch))
    os.replace(tmp, args.out)
    size = sum(len(e.data or b"") for layer in layers for e in layer.entries.values())
    print(f"images/oci.py: {args.name} {manifest_digest} ({size / 1e6:.1f} MB uncompressed) -> {args.out}", file=sys.stderr)
    return manifest_digest


def canonical(obj: object) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--name", required=True, help="full reference, e.g. ghcr.io/shotover-k8s/shotover:0.1.0")
    p.add_argument("--out", help="the archive to write")
    p.add_argument("--rootfs", help="write the image's files into this directory instead of an archive")
    p.add_argument("--bin", action="append", default=[], help="PATH[:DEST] executable; its libraries come too")
    p.add_argument("--file", action="append", default=[], help="SRC:DEST[:MODE] plain file")
    p.add_argument("--link", action="append", default=[], help="TARGET:DEST a symbolic link DEST -> TARGET")
    p.add_argument("--entrypoint", help="JSON array (default: the first --bin)")
    p.add_argument("--label", action="append", default=[], help="K=V image label")
    p.add_argument("--env", action="append", default=[], help="K=V environment variable")
    p.add_argument("--user", default=f"{NONROOT}:{NONROOT}")
    args = p.parse_args()
    if not args.bin:
        p.error("at least one --bin is needed")
    if not (args.out or args.rootfs):
        p.error("--out or --rootfs is needed")
    print(build(args))


if __name__ == "__main__":
    main()
