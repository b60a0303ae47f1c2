"""Every kind of file descriptor object the engine knows, in the order restore creates them (a pipe's inode
before its ends). Adding a kind: one module with a handler class (KIND, matches, dump, create), one line here."""
from __future__ import annotations

from .awarefd import AwareConnection
from .eventfds import Epoll, EventFd, SignalFd, TimerFd
from .files import Device, Directory, RegularFile
from .inotify import Inotify
from .pipes import PipeEnd, PipeInode
from .procfiles import ProcFile
from .tcp.kind import TcpSocket
from .terminals.ptys import PtyMaster, PtyPair, PtySlave
from .terminals.ttys import DevTty, Terminal
from .unixsock import UnixSocket

KINDS = [ProcFile, RegularFile, Directory, Device, PipeInode, PipeEnd, AwareConnection, UnixSocket, TcpSocket, EventFd,
         TimerFd, SignalFd, Epoll, Inotify, PtyPair, PtyMaster, PtySlave, DevTty, Terminal]
