#!/usr/bin/env python3
"""Run protoc-c on one .proto file for the meson build (proto/meson.build).

protoc-c writes its output under the .proto file's own path (gitlab/agent/x/x.pb-c.{c,h}), but a
meson custom_target may only declare outputs directly in its output directory. So this script:

  * runs protoc-c into a private scratch directory under OUTDIR;
  * installs the generated header at its nested path, OUTDIR/<proto path>.pb-c.h, which is how
    every C file (generated or ours) includes it: OUTDIR is on the include path. The nested header
    is only rewritten when its content changes, so unchanged protos do not force recompiles;
  * writes the generated .c to the flat output meson declared (--c-out);
  * writes the flat header meson declared (--h-out) as a one-line forward to the nested header;
    meson uses it to order compilation after generation;
  * writes a depfile naming every .proto the file imports, so edits to imported files regenerate;
  * renames service-method members that are C keywords (protoc-c 1.4.1 emits the method
    AgentRegistrar.Register as `void (*register)(...)`, which does not compile) to `<name>_`.

Generated code never lands in the source tree. Standard library only.
"""
import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile


def write_if_changed(path, data):
    """Write bytes to path atomically, leaving the file (and its mtime) alone if unchanged."""
    try:
        with open(path, "rb") as f:
            if f.read() == data:
                return
    except FileNotFoundError:
        pass
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "wb") as f:
        f.write(data)
    os.replace(tmp, path)


def write(path, data):
    """Write bytes to path atomically, always (meson-declared outputs must get a fresh mtime)."""
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "wb") as f:
        f.write(data)
    os.replace(tmp, path)


C_KEYWORDS = (
    "auto break case char const continue default do double else enum extern float for goto if "
    "inline int long register restrict return short signed sizeof static struct switch typedef "
    "union unsigned void volatile while _Alignas _Alignof _Atomic _Bool _Complex _Generic "
    "_Imaginary _Noreturn _Static_assert _Thread_local").split()
KEYWORD_MEMBER = re.compile(rb"\(\*(" + "|".join(C_KEYWORDS).encode() + rb")\)\(")


def fix_keyword_members(code):
    """protoc-c names a service struct's function-pointer members after the lower-cased method
    names; rename those that are C keywords (`(*register)(` -> `(*register_)(`). Only the header's
    struct declaration uses the member name; the .c and the INIT macro do not."""
    return KEYWORD_MEMBER.sub(rb"(*\1_)(", code)


def parse_depfile(text):
    """Return the prerequisites of a make-style depfile written by protoc's --dependency_out."""
    text = text.replace("\\\n", " ")
    _, _, deps = text.partition(": ")
    return [d for d in deps.split() if d != "\\"]


def depfile_escape(path):
    return path.replace("\\", "\\\\").replace(" ", "\\ ").replace("$", "$$").replace("#", "\\#")


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--protoc-c", required=True, help="protoc-c executable")
    ap.add_argument("--proto-path", required=True, help="root of the .proto tree (source dir)")
    ap.add_argument("--outdir", required=True, help="build directory for the generated code")
    ap.add_argument("--c-out", required=True, help="flat .c output declared to meson")
    ap.add_argument("--h-out", required=True, help="flat .h output declared to meson")
    ap.add_argument("--depfile", help="depfile to write")
    ap.add_argument("proto", help="the .proto file, relative to --proto-path")
    a = ap.parse_args()

    if not a.proto.endswith(".proto") or os.path.isabs(a.proto):
        sys.exit(f"gen.py: expected a relative path ending in .proto, got {a.proto!r}")
    proto_path = os.path.abspath(a.proto_path)
    base = a.proto[: -len(".proto")]
    os.makedirs(a.outdir, exist_ok=True)
    scratch = tempfile.mkdtemp(prefix=".protoc-c-", dir=a.outdir)
    try:
        deps_out = os.path.join(scratch, "deps.d")
        cmd = [a.protoc_c, f"--c_out={scratch}", f"--proto_path={proto_path}",
               f"--dependency_out={deps_out}", os.path.join(proto_path, a.proto)]
        r = subprocess.run(cmd)
        if r.returncode != 0:
            sys.exit(f"gen.py: protoc-c failed ({r.returncode}): {' '.join(cmd)}")
        with open(os.path.join(scratch, base + ".pb-c.c"), "rb") as f:
            c_code = f.read()
        with open(os.path.join(scratch, base + ".pb-c.h"), "rb") as f:
            h_code = fix_keyword_members(f.read())
        with open(deps_out) as f:
            deps = parse_depfile(f.read())
    finally:
        shutil.rmtree(scratch, ignore_errors=True)

    write_if_changed(os.path.join(a.outdir, base + ".pb-c.h"), h_code)
    write(a.c_out, c_code)
    write(a.h_out, (f"/* Generated by proto/gen.py from {a.proto}. Include the nested header:"
                    f" */\n#include \"{base}.pb-c.h\"\n").encode())
    if a.depfile:
        deps = [d if os.path.isabs(d) else os.path.join(proto_path, d) for d in deps]
        with open(a.depfile, "w") as f:
            f.write(depfile_escape(a.c_out) + ": " + " ".join(map(depfile_escape, deps)) + "\n")


if __name__ == "__main__":
    main()
