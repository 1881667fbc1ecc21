#!/bin/busybox sh
# /init of the guests of `cargo xtask vm` (xtask/src/vm/), run by busybox sh.
#
# Mounts the kernel's filesystems, loads the modules listed in
# /lib/modules/load-order (dependencies first), then serves the host: it reads one
# command per line from the second serial port (ttyS1, QEMU's stdio), runs it in
# this shell (so a step can keep a file open for the next one), and answers with the
# command's output, each line prefixed "@@| ", then "@@end STATUS". The kernel's
# console is ttyS0, which QEMU writes to a file.
/bin/busybox --install -s /bin
export PATH=/sbin:/bin
# The tools' stderr reaches the host's terminal as plain text.
export NO_COLOR=1
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
mount -t tmpfs tmpfs /tmp
# No modprobe in here: the kernel's requests for optional modules fail at once.
echo /bin/false > /proc/sys/kernel/modprobe
while read -r ko; do
    insmod "/lib/modules/$ko" || echo "init: insmod $ko failed"
done < /lib/modules/load-order
# The kernel passes unknown "name=value" boot parameters to init as variables.
hostname "vm${guest:-0}"
mkdir -p /var/lib/atsfs /var/log /mnt/atsfs
. /steps.sh

stty -F /dev/ttyS1 raw -echo
exec 3<>/dev/ttyS1
echo "@@ready uptime $(cut -d' ' -f1 /proc/uptime) s" >&3
while read -r line <&3; do
    eval "$line" > /tmp/step.out 2>&1 < /dev/null
    status=$?
    sed 's/^/@@| /' /tmp/step.out >&3
    echo "@@end $status" >&3
done
poweroff -f
