#!/usr/bin/env bash
# Installs fusecache on a machine with no package registry (the device machine of the node-
# scale benchmark), from files carried in CARRY (default .device), made on a machine that has
# one with:
#   apt-get download fuse3 libfuse3-3 libfuse3-dev
#   pip download pyfuse3==3.5.0 --no-binary :all: --no-deps        (the sdist: generated C)
#   pip download trio==0.22.2 outcome sniffio setuptools setuptools_scm vcs-versioning --no-deps
#   pip download cython --only-binary=:all: --python-version 3.12 --platform manylinux2014_x86_64 --no-deps
# libfuse3 is unpacked under /tmp/fuse-root, pyfuse3 is built against it with a pkg-config
# stand-in, and Python packages go to /tmp/site. Source it: it exports PATH and PYTHONPATH.
set -euo pipefail
CARRY=${CARRY:-.device}
PREFIX=/tmp/fuse-root
LIBDIR=$PREFIX/lib/x86_64-linux-gnu  # Debian ships libfuse3.so.3 in /lib
mkdir -p "$PREFIX/bin" /tmp/site
for deb in "$CARRY"/*.deb; do dpkg -x "$deb" "$PREFIX"; done
cat > "$PREFIX/bin/pkg-config" <<PC
#!/bin/sh
case "\$*" in
  *--atleast-version*) exit 0 ;;
  *--modversion*) echo 3.14.0 ;;
  *--cflags*) echo "-I$PREFIX/usr/include/fuse3" ;;
  *--libs*) echo "$LIBDIR/libfuse3.so.3 -Wl,-rpath,$LIBDIR" ;;  # a path, not -l: the system may have another libfuse3
esac
PC
chmod +x "$PREFIX/bin/pkg-config"
export PATH="$PREFIX/bin:$PREFIX/sbin:$PATH"
python3 -m pip install -q --no-index --no-deps --no-compile --upgrade --target /tmp/site "$CARRY"/*.whl
export PYTHONPATH="/tmp/site:$PWD/src:$PWD"
python3 -m pip install -q --no-index --no-deps --no-build-isolation --target /tmp/site "$CARRY"/pyfuse3-*.tar.gz
python3 -c "import pyfuse3, trio; print('pyfuse3', pyfuse3.__version__, 'trio', trio.__version__)"
