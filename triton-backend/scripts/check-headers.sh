#!/usr/bin/env bash
# CI check: include/pregate_triton_api.h must agree with Triton 2.51's real headers, taken from the
# source of the crate tritonserver-rs 0.4.1 (fetched with `cargo fetch`, never compiled).
#  1. every function declaration: both headers in one C++ translation unit (a differing
#     redeclaration of an extern "C" function does not compile);
#  2. every enum value: static_asserts generated from our header against the real enums.
set -euo pipefail
here="$(cd "$(dirname "$0")/.." && pwd)"
tmp="$(mktemp -d)"; trap 'rm -rf "$tmp"' EXIT
mkdir -p "$tmp/fetch/src" && touch "$tmp/fetch/src/lib.rs"
cat > "$tmp/fetch/Cargo.toml" <<'TOML'
[package]
name = "fetch-triton-headers"
version = "0.0.0"
edition = "2021"
[dependencies]
tritonserver-rs = "=0.4.1"
[workspace]
TOML
cargo fetch -q --manifest-path "$tmp/fetch/Cargo.toml" >&2
src="$(cargo metadata -q --format-version 1 --manifest-path "$tmp/fetch/Cargo.toml" |
  python3 -c 'import json,sys,os; m=json.load(sys.stdin); print(next(os.path.dirname(p["manifest_path"]) for p in m["packages"] if p["name"]=="tritonserver-rs"))')"
inc="$src/core/include"
test -f "$inc/triton/core/tritonbackend.h"
cxx="${CXX:-g++}"
printf '#include <stddef.h>\n#include <stdint.h>\n#include "triton/core/tritonbackend.h"\n#define PREGATE_TRITON_NO_ENUMS\n#include "pregate_triton_api.h"\n' > "$tmp/functions.cc"
"$cxx" -std=c++17 -fsyntax-only -I "$inc" -I "$here/include" "$tmp/functions.cc"
python3 - "$here/include/pregate_triton_api.h" > "$tmp/enums.cc" <<'PY'
import re, sys
text = open(sys.argv[1]).read()
print('#include <stddef.h>\n#include <stdint.h>\nnamespace real {\n#include "triton/core/tritonbackend.h"\n}')
print('#define PREGATE_TRITON_NO_FUNCTIONS\n#include "pregate_triton_api.h"')
n = 0
for body in re.findall(r"typedef enum \w+ \{(.*?)\}", text, re.S):
    for item in body.split(","):
        name = item.split("=")[0].strip()
        if name:
            print(f'static_assert((int)real::{name} == (int)::{name}, "{name} differs");')
            n += 1
assert n > 40, n
PY
"$cxx" -std=c++17 -fsyntax-only -I "$inc" -I "$here/include" "$tmp/enums.cc"
echo "check-headers: pregate_triton_api.h agrees with Triton 2.51 (tritonserver-rs 0.4.1)"
