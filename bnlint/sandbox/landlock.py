"""Linux Landlock and seccomp, through ctypes: the kernel's own walls around the child that runs a model.

Landlock (Linux 5.13+) lets an unprivileged process restrict itself: once `restrict_self` is
called, every access right the ruleset *handles* is denied unless a rule grants it beneath a
path; the restriction is inherited by threads and children and can never be lifted. We handle
every file-system right the kernel knows (its ABI version says which), TCP bind/connect from
ABI 4, and abstract-socket/signal scoping from ABI 6, and grant:

- read (and execute) beneath the Python installation, the system libraries and the model's own
  inputs: whatever the job is allowed to read;
- read and write beneath one private temporary folder;
- device files the runtime needs (/dev/null, /dev/urandom, GPUs) with read, write and ioctl.

seccomp adds what Landlock cannot express: no socket of any family but AF_UNIX (UDP, raw and
netlink sockets included), so the child cannot reach a network even where Landlock has no
network rules. Both need `no_new_privs`, which we set first.

Syscall numbers of Landlock are the same on every architecture (444-446). References: the
kernel's Documentation/userspace-api/landlock.rst and include/uapi/linux/landlock.h;
seccomp(2) and include/uapi/linux/{filter,seccomp,audit}.h.
"""

from __future__ import annotations

import ctypes
import os
import platform
from dataclasses import dataclass
from typing import Iterable

SYS_CREATE_RULESET, SYS_ADD_RULE, SYS_RESTRICT_SELF = 444, 445, 446
CREATE_RULESET_VERSION = 1 << 0
RULE_PATH_BENEATH = 1
PR_SET_NO_NEW_PRIVS = 38
PR_SET_SECCOMP = 22
SECCOMP_MODE_FILTER = 2

# Access rights, and the ABI that introduced them (include/uapi/linux/landlock.h).
FS_EXECUTE = 1 << 0
FS_WRITE_FILE = 1 << 1
FS_READ_FILE = 1 << 2
FS_READ_DIR = 1 << 3
FS_REMOVE_DIR = 1 << 4
FS_REMOVE_FILE = 1 << 5
FS_MAKE_CHAR = 1 << 6
FS_MAKE_DIR = 1 << 7
FS_MAKE_REG = 1 << 8
FS_MAKE_SOCK = 1 << 9
FS_MAKE_FIFO = 1 << 10
FS_MAKE_BLOCK = 1 << 11
FS_MAKE_SYM = 1 << 12
FS_REFER = 1 << 13  # ABI 2
FS_TRUNCATE = 1 << 14  # ABI 3
FS_IOCTL_DEV = 1 << 15  # ABI 5
NET_BIND_TCP = 1 << 0  # ABI 4
NET_CONNECT_TCP = 1 << 1
SCOPE_ABSTRACT_UNIX_SOCKET = 1 << 0  # ABI 6
SCOPE_SIGNAL = 1 << 1

READ = FS_EXECUTE | FS_READ_FILE | FS_READ_DIR
WRITE = (FS_WRITE_FILE | FS_REMOVE_DIR | FS_REMOVE_FILE | FS_MAKE_DIR | FS_MAKE_REG | FS_MAKE_SYM | FS_REFER
         | FS_TRUNCATE)
DEVICE = FS_READ_FILE | FS_WRITE_FILE | FS_IOCTL_DEV


def _fs_rights(abi: int) -> int:
    rights = (1 << 13) - 1
    if abi >= 2:
        rights |= FS_REFER
    if abi >= 3:
        rights |= FS_TRUNCATE
    if abi >= 5:
        rights |= FS_IOCTL_DEV
    return rights


class RulesetAttr(ctypes.Structure):
    _fields_ = [("handled_access_fs", ctypes.c_uint64), ("handled_access_net", ctypes.c_uint64),
                ("scoped", ctypes.c_uint64)]


class PathBeneathAttr(ctypes.Structure):
    _pack_ = 1  # the kernel's struct is __attribute__((packed))
    _fields_ = [("allowed_access", ctypes.c_uint64), ("parent_fd", ctypes.c_int32)]


def _libc() -> ctypes.CDLL:
    return ctypes.CDLL(None, use_errno=True)


def abi_version() -> int:
    """The kernel's Landlock ABI (0: none, or not Linux)."""
    if platform.system() != "Linux":
        return 0
    try:
        version = _libc().syscall(SYS_CREATE_RULESET, None, ctypes.c_size_t(0), ctypes.c_uint32(CREATE_RULESET_VERSION))
    except (OSError, AttributeError):
        return 0
    return max(int(version), 0)


@dataclass(frozen=True)
class Policy:
    """What the child may touch once restricted."""

    read: tuple[str, ...]  # read + execute beneath each
    write: tuple[str, ...]  # read + write beneath each
    devices: tuple[str, ...] = ()  # read, write and ioctl on these device files


def _no_new_privs(libc: ctypes.CDLL) -> None:
    if libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_NO_NEW_PRIVS)")


def restrict(policy: Policy) -> int:
    """Apply the Landlock ruleset to this process (and all it starts); return the ABI used (0: none).

    Paths that do not exist are skipped; every right is masked to what the kernel knows.
    """
    abi = abi_version()
    if abi < 1:
        return 0
    libc = _libc()
    handled = _fs_rights(abi)
    attr = RulesetAttr(handled, (NET_BIND_TCP | NET_CONNECT_TCP) if abi >= 4 else 0,
                       (SCOPE_ABSTRACT_UNIX_SOCKET | SCOPE_SIGNAL) if abi >= 6 else 0)
    size = ctypes.sizeof(RulesetAttr) if abi >= 6 else (16 if abi >= 4 else 8)
    ruleset = libc.syscall(SYS_CREATE_RULESET, ctypes.byref(attr), ctypes.c_size_t(size), ctypes.c_uint32(0))
    if ruleset < 0:
        raise OSError(ctypes.get_errno(), "landlock_create_ruleset")
    try:
        for paths, rights in ((policy.read, READ), (policy.write, READ | WRITE), (policy.devices, DEVICE)):
            for path in _existing(paths):
                _add_rule(libc, ruleset, path, rights & handled)
        _no_new_privs(libc)
        if libc.syscall(SYS_RESTRICT_SELF, ctypes.c_int(ruleset), ctypes.c_uint32(0)) != 0:
            raise OSError(ctypes.get_errno(), "landlock_restrict_self")
    finally:
        os.close(ruleset)
    return abi


def _existing(paths: Iterable[str]) -> list[str]:
    return sorted({os.path.realpath(p) for p in paths if p and os.path.exists(p)})


def _add_rule(libc: ctypes.CDLL, ruleset: int, path: str, rights: int) -> None:
    try:
        fd = os.open(path, os.O_PATH | os.O_CLOEXEC)
    except OSError:
        return
    try:
        if not os.path.isdir(path):
            # Rights on a file: only those that make sense for a file (the kernel refuses the rest).
            rights &= FS_EXECUTE | FS_WRITE_FILE | FS_READ_FILE | FS_TRUNCATE | FS_IOCTL_DEV
        rule = PathBeneathAttr(rights, fd)
        if libc.syscall(SYS_ADD_RULE, ctypes.c_int(ruleset), ctypes.c_int(RULE_PATH_BENEATH), ctypes.byref(rule),
                        ctypes.c_uint32(0)) != 0:
            raise OSError(ctypes.get_errno(), f"landlock_add_rule({path})")
    finally:
        os.close(fd)


# --- seccomp: sockets of the AF_UNIX family only ---------------------------------------------

_AUDIT_ARCH = {"x86_64": (0xC000003E, 41), "aarch64": (0xC00000B7, 198)}  # AUDIT_ARCH_*, __NR_socket
_BPF_LD_W_ABS, _BPF_JEQ_K, _BPF_JGE_K, _BPF_RET_K = 0x20, 0x15, 0x35, 0x06
_SECCOMP_RET_ALLOW, _SECCOMP_RET_ERRNO, _SECCOMP_RET_KILL_PROCESS = 0x7FFF0000, 0x00050000, 0x80000000
_EACCES, _AF_UNIX = 13, 1


class _SockFilter(ctypes.Structure):
    _fields_ = [("code", ctypes.c_uint16), ("jt", ctypes.c_uint8), ("jf", ctypes.c_uint8), ("k", ctypes.c_uint32)]


class _SockFprog(ctypes.Structure):
    _fields_ = [("len", ctypes.c_uint16), ("filter", ctypes.POINTER(_SockFilter))]


def deny_network() -> bool:
    """Install a seccomp filter: socket() of any family but AF_UNIX fails with EACCES. False where
    the architecture is not one we know (the caller then reports that the network is not walled)."""
    known = _AUDIT_ARCH.get(platform.machine())
    if known is None or platform.system() != "Linux":
        return False
    arch, nr_socket = known
    # struct seccomp_data: int nr; __u32 arch; __u64 instruction_pointer; __u64 args[6] (low word first on LE)
    program = [
        (_BPF_LD_W_ABS, 0, 0, 4),  # 0: A = arch
        (_BPF_JEQ_K, 0, 7, arch),  # 1: another ABI (i386 through int 0x80): kill
        (_BPF_LD_W_ABS, 0, 0, 0),  # 2: A = nr
        (_BPF_JGE_K, 5, 0, 0x40000000),  # 3: x32 system calls (same arch, bit 30 set): kill
        (_BPF_JEQ_K, 0, 2, nr_socket),  # 4: not socket(): allow
        (_BPF_LD_W_ABS, 0, 0, 16),  # 5: A = low word of args[0], the address family
        (_BPF_JEQ_K, 0, 1, _AF_UNIX),  # 6
        (_BPF_RET_K, 0, 0, _SECCOMP_RET_ALLOW),  # 7
        (_BPF_RET_K, 0, 0, _SECCOMP_RET_ERRNO | _EACCES),  # 8
        (_BPF_RET_K, 0, 0, _SECCOMP_RET_KILL_PROCESS),  # 9
    ]
    filters = (_SockFilter * len(program))(*[_SockFilter(*row) for row in program])
    fprog = _SockFprog(len(program), ctypes.cast(filters, ctypes.POINTER(_SockFilter)))
    libc = _libc()
    _no_new_privs(libc)
    if libc.prctl(PR_SET_SECCOMP, SECCOMP_MODE_FILTER, ctypes.byref(fprog), 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_SECCOMP)")
    return True


__all__ = ["Policy", "abi_version", "deny_network", "restrict"]
