"""The userfaultfd of write tracking (wptrack.py) as seen from outside a process: the kernel's constants, and
which descriptor in a job process is ours - left out of the job's fd table (fds/entry.list_fds), never saved.
A module of its own so that both the fd listing and write tracking can use it."""
from __future__ import annotations

UFFD_USER_MODE_ONLY = 1
UFFD_API = 0xAA
FEATURE_WP_UNPOPULATED = 1 << 13
FEATURE_WP_ASYNC = 1 << 15
UFFDIO_API = 0xC018AA3F           # _IOWR(0xAA, 0x3F, struct uffdio_api)
UFFDIO_REGISTER = 0xC020AA00      # _IOWR(0xAA, 0x00, struct uffdio_register)
REGISTER_MODE_WP = 1 << 1
SCAN_WP_MATCHING = 1 << 0
SCAN_CHECK_WPASYNC = 1 << 1
O_CLOEXEC = 0o2000000
F_DUPFD_CLOEXEC = 1030
USERFAULTFD = 323                 # x86_64 system call numbers
IOCTL = 16

our_fds: set[int] = set()        # numbers of the descriptors we made (children inherit them at the same number)


def is_ours(fd: int, target: str, info_text: str) -> bool:
    """A descriptor of ours in a process (or inherited from one by a child): not part of what it saves."""
    return fd in our_fds and target == "anon_inode:[userfaultfd]" and _has_our_features(info_text)


def _has_our_features(info_text: str) -> bool:
    for line in info_text.splitlines():
        if line.startswith("API:"):                    # "API:\tAAh:FEATURESh:IOCTLSh"
            try:
                features = int(line.split(":")[2].rstrip("h"), 16)
            except (IndexError, ValueError):
                return False
            return features & FEATURE_WP_ASYNC == FEATURE_WP_ASYNC
    return False
