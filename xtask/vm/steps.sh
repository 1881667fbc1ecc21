# The steps of the `cargo xtask vm` scenario, as the guest runs them: /init sources
# this file and runs each command line the host sends (xtask/src/vm/scenario.rs
# chooses the steps and judges what they print). DEV is the shared disk, which
# the host sets first (`DEV=/dev/sda`); every volume is mounted on $M.
M=/mnt/atsfs

# The shared disk as this kernel sees it.
disk_info() {
    ls -l "$DEV"
    for f in vendor model; do
        [ -r "/sys/class/block/${DEV#/dev/}/device/$f" ] &&
            echo "$f: $(cat "/sys/class/block/${DEV#/dev/}/device/$f")"
    done
    echo "size: $(cat "/sys/class/block/${DEV#/dev/}/size") sectors of 512 bytes"
}

# make_volume ATS: mkfs.atsfs with --ats ATS (it runs the ATS self-test first
# where the disk has hardware ATS, and prints its report).
make_volume() {
    mkfs.atsfs -f -L vm-shared --ats "$1" "$DEV"
}

mount_volume() {
    atsfs mount "$DEV" "$M" || { tail -n 20 /var/log/atsfs.log; return 1; }
    grep " $M " /proc/mounts
}

volume_status() {
    atsfs status "$DEV"
}

# write_file NAME TEXT: writes and fsyncs a file, prints its checksum.
write_file() {
    printf '%s\n' "$2" | dd of="$M/$1" conv=fsync 2>/dev/null || return 1
    sha256sum "$M/$1"
}

# read_file NAME: prints a file's checksum and its text.
read_file() {
    sha256sum "$M/$1" && cat "$M/$1"
}

# create_files DIR PREFIX COUNT: creates COUNT empty files DIR/PREFIX1... (the
# directory may be made by another guest at the same moment).
create_files() {
    mkdir -p "$M/$1" || return 1
    i=1
    start=$(cut -d' ' -f1 /proc/uptime)
    while [ "$i" -le "$3" ]; do
        : > "$M/$1/$2$i" || return 1
        i=$((i + 1))
    done
    echo "created $3 files in $1 ($start s -> $(cut -d' ' -f1 /proc/uptime) s uptime)"
}

# list_dir DIR: the number of entries and a checksum of the sorted names.
list_dir() {
    echo "entries $(ls "$M/$1" | wc -l) names-sha256 $(ls "$M/$1" | sort | sha256sum | cut -d' ' -f1)"
}

# ats_count: the COMPARE AND WRITEs (ATS) this host's filesystem sent since mount.
ats_count() {
    atsfs stats "$M" | sed -n 's/^ *ATS *//p'
}

# hold_open NAME TEXT: opens NAME for writing on fd 4 of /init's shell, which keeps
# it open after the step; writes TEXT through a second open and fsyncs it.
hold_open() {
    exec 4>>"$M/$1" || return 1
    printf '%s\n' "$2" | dd of="$M/$1" conv=fsync 2>/dev/null || return 1
    echo "$M/$1 is open for writing (fd 4 of pid $$): $(cat "$M/$1")"
}

# open_for_writing NAME: tries to open NAME for writing (and closes it at once).
open_for_writing() {
    ( exec 5>>"$M/$1" ) 2>&1
}

# fsynced_files DIR COUNT: COUNT files, each written and fsynced.
fsynced_files() {
    mkdir -p "$M/$1" || return 1
    i=1
    while [ "$i" -le "$2" ]; do
        echo "file $i from $(hostname)" | dd of="$M/$1/f$i" conv=fsync 2>/dev/null || return 1
        i=$((i + 1))
    done
    echo "wrote and fsynced $2 files in $1"
}

# check_files DIR COUNT HOST: every file of fsynced_files DIR COUNT on HOST is there.
check_files() {
    i=1
    while [ "$i" -le "$2" ]; do
        [ "$(cat "$M/$1/f$i")" = "file $i from $3" ] || { echo "f$i: wrong or missing"; return 1; }
        i=$((i + 1))
    done
    echo "all $2 files of $3 in $1 read back"
}

# take_over NAME TEXT SECONDS: opens NAME for writing, retrying each second for up
# to SECONDS while it is busy; then overwrites it with TEXT.
take_over() {
    start=$(cut -d' ' -f1 /proc/uptime)
    tries=0
    until ( exec 5>>"$M/$1" ) 2>/dev/null; do
        tries=$((tries + 1))
        [ "$tries" -ge "$3" ] && { echo "still busy after $3 tries"; return 1; }
        sleep 1
    done
    echo "opened for writing after $tries busy tries ($start s -> $(cut -d' ' -f1 /proc/uptime) s uptime)"
    echo "before: $(cat "$M/$1")"
    printf '%s\n' "$2" | dd of="$M/$1" conv=fsync 2>/dev/null || return 1
    echo "after: $(cat "$M/$1")"
}

# recovery_log: what the daemon logged about dead hosts, fencing and replays.
recovery_log() {
    grep -i -E 'recover|replay|fence|preempt|dead' /var/log/atsfs.log
}

daemon_log() {
    tail -n "${1:-30}" /var/log/atsfs.log
}

# unmount_volume: unmounts; the daemon writes everything back and exits.
unmount_volume() {
    umount "$M" || return 1
    n=0
    while pidof atsfs > /dev/null; do
        n=$((n + 1))
        [ "$n" -ge 60 ] && { echo "the daemon still runs 60 s after umount"; return 1; }
        sleep 1
    done
    echo "unmounted; the daemon exited"
}

check_volume() {
    atsfs fsck "$DEV"
}
