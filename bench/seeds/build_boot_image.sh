#!/usr/bin/env bash
# Builds the bootable image of seed experiment 2 (bench/seeds/boot.py) into
# DIR (default /var/tmp/blockway-seeds-boot), once: a second run with the
# files present does nothing.
#
#   DIR/vmlinuz     Debian's cloud kernel (linux-image-cloud-amd64's image
#                   package, fetched with `apt-get download` and unpacked
#                   with dpkg-deb -x: nothing is installed on the host)
#   DIR/initrd.gz   busybox (static) + the virtio modules: loads them, mounts
#                   /dev/vda (ext4) and switch_roots into it
#   DIR/root.img    an ext4 root filesystem (ROOT_MIB, default 1024 MiB) made
#                   with mkfs.ext4 -d (no mount): busybox, the kernel's module
#                   tree (~90 MiB) and /sbin/init, which prints SEEDS-INIT-START,
#                   does what a boot does
#                   with its disk (reads its programs and every module file,
#                   as udev's coldplug and the services would), then prints
#                   the marker SEEDS-BOOT-DONE on the serial console and
#                   powers off (with seeds_id=NAME on the kernel command
#                   line it first writes to its root: see the init below);
#                   and FILLER_MIB (640) of random data the boot never
#                   reads, as a VM image holds more than its boot needs
#
# Not debootstrap: it is not installed here, and a busybox root keeps the
# build to seconds. Usage: bench/seeds/build_boot_image.sh [DIR]
set -euo pipefail
DIR=${1:-/var/tmp/blockway-seeds-boot}
ROOT_MIB=${ROOT_MIB:-1024}
FILLER_MIB=${FILLER_MIB:-640}
export PATH=/usr/bin:/bin:/usr/sbin:/sbin:$PATH
die() { echo "${0##*/}: $*" >&2; exit 1; }
VERSION=4   # bump when what is built changes: a cached older build is rebuilt
[[ -s $DIR/vmlinuz && -s $DIR/initrd.gz && -s $DIR/root.img && $(cat "$DIR/version" 2>/dev/null) == "$VERSION" ]] && exit 0
for t in apt-get apt-cache dpkg-deb mkfs.ext4; do command -v $t >/dev/null || die "missing tool: $t"; done
if ! { [[ -x /bin/busybox ]] && file -L /bin/busybox | grep -q "statically linked"; }; then
    die "needs a static /bin/busybox (apt-get install busybox-static)"
fi

mkdir -p "$DIR"
cd "$DIR"
rm -rf work && mkdir work && cd work
pkg=$(apt-cache depends linux-image-cloud-amd64 | awk '/Depends: linux-image-/ {print $2; exit}')
[[ -n $pkg ]] || die "cannot resolve linux-image-cloud-amd64 to a kernel package"
echo "fetching $pkg ..." >&2
apt-get download "$pkg" >/dev/null 2>&1 || apt-get download "$pkg" || die "apt-get download $pkg failed"
dpkg-deb -x ./"$pkg"_*.deb kroot
kver=$(ls kroot/lib/modules)
mods=kroot/lib/modules/$kver/kernel/drivers

# initramfs: busybox, the virtio modules in dependency order, /init
mkdir -p initrd/{bin,dev,proc,sys,newroot,mod}
cp /bin/busybox initrd/bin/busybox
ln -s busybox initrd/bin/sh
for m in virtio/virtio_ring virtio/virtio virtio/virtio_pci_legacy_dev virtio/virtio_pci_modern_dev \
         virtio/virtio_pci block/virtio_blk; do
    cp "$mods/$m.ko" initrd/mod/
done
cat >initrd/init <<'INIT'
#!/bin/sh
/bin/busybox mount -t proc proc /proc
/bin/busybox mount -t devtmpfs dev /dev
for m in virtio_ring virtio virtio_pci_legacy_dev virtio_pci_modern_dev virtio_pci virtio_blk; do
    /bin/busybox insmod /mod/$m.ko
done
for i in $(/bin/busybox seq 100); do [ -b /dev/vda ] && break; /bin/busybox usleep 50000; done
/bin/busybox mount -t ext4 -o ro /dev/vda /newroot || { echo "SEEDS-BOOT-FAILED: no root"; /bin/busybox poweroff -f; }
/bin/busybox umount /proc
/bin/busybox mount --move /dev /newroot/dev
exec /bin/busybox switch_root /newroot /sbin/init
INIT
chmod +x initrd/init
(cd initrd && find . | busybox cpio -o -H newc 2>/dev/null) | gzip -9 >initrd.gz

# the root filesystem
mkdir -p root/{bin,sbin,dev,proc,sys,tmp,lib,etc}
cp /bin/busybox root/bin/busybox
for a in sh cat find xargs mount umount poweroff echo sleep; do ln -s busybox root/bin/$a; done
cp -a kroot/lib/modules root/lib/
cp -a kroot/boot root/boot
# Data the boot does not read (a VM image holds far more than its boot
# needs): a prefetch must copy it too, so the order it copies in matters.
mkdir -p root/var/lib
head -c $((FILLER_MIB << 20)) /dev/urandom >root/var/lib/filler.bin
cat >root/sbin/init <<'INIT'
#!/bin/sh
# What a boot does with its disk: the programs and every module file read once.
echo "SEEDS-INIT-START"
mount -t proc proc /proc
cat /bin/busybox /boot/* >/dev/null
find /lib/modules -type f | xargs cat >/dev/null
# seeds_id=NAME on the kernel command line (tests/integration/test_clone_boot.py):
# the VM writes to its disk as a booted system does: its root remounted
# read-write, the previous boot's name reported, its own name and 1 MiB of
# data of its own written, all synced, and the root back to read-only.
id=$(busybox sed -n 's/.*seeds_id=\([A-Za-z0-9_-]*\).*/\1/p' /proc/cmdline)
if [ -n "$id" ]; then
    mount -o remount,rw / || echo "SEEDS-REMOUNT-FAILED"
    [ -f /etc/seeds-id ] && echo "SEEDS-PREVIOUS-ID=$(cat /etc/seeds-id)"
    echo "$id" >/etc/seeds-id
    busybox dd if=/dev/urandom of=/var/lib/"$id".bin bs=64k count=16 2>/dev/null
    busybox sync
    mount -o remount,ro / || echo "SEEDS-REMOUNT-FAILED"
    echo "SEEDS-WROTE-ID=$id"
fi
echo "SEEDS-BOOT-DONE"
poweroff -f
INIT
chmod +x root/sbin/init
rm -f root.img
mkfs.ext4 -q -F -L seedroot -d root root.img "${ROOT_MIB}M"
cp kroot/boot/vmlinuz-"$kver" ../vmlinuz.tmp
mv initrd.gz ../initrd.gz
mv root.img ../root.img
mv ../vmlinuz.tmp ../vmlinuz
cd .. && rm -rf work
echo "$VERSION" >version
echo "built $DIR: kernel $kver, root.img ${ROOT_MIB} MiB" >&2
