#!/bin/sh
# Assembles the container image's files from a built `stratus` binary:
#
#   packaging/rootfs.sh BINARY DEST
#
# DEST/base/ is the root filesystem, owned by root: the binary without its debug info
# (usr/local/bin/stratus), exactly the shared libraries it loads (as `ldd` lists them, with
# the dynamic loader) at the paths it looks them up, /etc/passwd and /etc/group naming the
# runtime user 10001, /etc/nsswitch.conf and /tmp (1777). Nothing else: no shell, no package
# manager, no library it does not load. DEST/owned/ holds what the runtime user owns: the
# volume's mount point data/ (the Dockerfile copies it with --chown; a COPY keeps no owner).
#
# The Dockerfile's `build` stage runs this on the binary it compiles; CI
# (tests/container/run.sh) on the binary `.ci/run` built; both feed the result to the
# Dockerfile's one `runtime` stage. Needs `ldd` and `strip` (libc-bin, binutils).
set -eu

if [ "$#" -ne 2 ]; then
    echo "usage: $0 BINARY DEST" >&2
    exit 2
fi
bin=$1
dest=$2
if [ ! -f "$bin" ] || [ ! -x "$bin" ]; then
    echo "$0: $bin is not an executable file" >&2
    exit 2
fi
base=$dest/base

mkdir -p "$base/usr/local/bin" "$base/etc" "$base/tmp" "$dest/owned/data"
chmod 1777 "$base/tmp"
chmod 0750 "$dest/owned/data"

# Symbols stay (a panic's backtrace names its functions); the DWARF debug info goes.
strip --strip-debug -o "$base/usr/local/bin/stratus" "$bin"
chmod 0755 "$base/usr/local/bin/stratus"

# `ldd` prints "libssl.so.3 => /lib/x86_64-linux-gnu/libssl.so.3 (0x…)" for a library and
# "/lib64/ld-linux-x86-64.so.2 (0x…)" for the loader; the vDSO has no file. For a static
# binary it prints "not a dynamic executable" and fails: then there is nothing to copy.
libs=$(ldd "$bin" 2>/dev/null | awk '
    $2 == "=>" && $3 ~ /^\// { print $3; next }
    $1 ~ /^\// { print $1 }
') || libs=
if ldd "$bin" 2>/dev/null | grep -q 'not found'; then
    echo "$0: $bin needs a library this system lacks:" >&2
    ldd "$bin" | grep 'not found' >&2
    exit 1
fi
for lib in $libs; do
    # The file itself (cp -L), at the path the loader looks it up, not a symlink into a
    # directory the image does not have.
    mkdir -p "$base$(dirname "$lib")"
    cp -L "$lib" "$base$lib"
done

cat >"$base/etc/passwd" <<'PASSWD'
root:x:0:0:root:/root:/sbin/nologin
stratus:x:10001:10001:Stratus:/data:/sbin/nologin
PASSWD
cat >"$base/etc/group" <<'GROUP'
root:x:0:
stratus:x:10001:
GROUP
# glibc's files and dns lookups are built into libc.so.6 (2.34 and later): webhooks resolve
# names through /etc/hosts and the /etc/resolv.conf that the container runtime mounts.
echo 'hosts: files dns' >"$base/etc/nsswitch.conf"
