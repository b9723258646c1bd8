"""The authorisation rules without a server: who is an admin, a verified process's groups,
and which TCP listeners may start."""

from __future__ import annotations

import os
import subprocess

import pytest

from broker.service.authz import AdminPolicy, process_groups, resolve_groups
from broker.service.tls import TransportError, check_listener, is_loopback, tls_files


def test_admins_are_root_the_broker_uid_and_admin_groups() -> None:
    p = AdminPolicy(gids=frozenset({27}), subjects=frozenset({"CN=ops"}), broker_uid=999)
    assert p.unix_admin(0, frozenset())
    assert p.unix_admin(999, frozenset())
    assert p.unix_admin(1000, frozenset({100, 27}))
    assert not p.unix_admin(1000, frozenset({100}))
    assert p.tls_admin("CN=ops")
    assert not p.tls_admin("CN=ops,O=other")  # exact subjects, no prefix match


def test_admin_groups_by_name_or_number() -> None:
    assert resolve_groups(["root", "4242"]) == frozenset({0, 4242})
    with pytest.raises(ValueError, match="no such group"):
        resolve_groups(["no-such-group-here"])


def test_groups_come_from_the_kernel_while_the_process_lives() -> None:
    """A real child: its Groups: line while alive; nothing once its pidfd says it exited
    (its pid may then be anyone's)."""
    child = subprocess.Popen(["sleep", "30"])
    fd = os.pidfd_open(child.pid)
    try:
        assert process_groups(child.pid, fd) == frozenset(os.getgroups())
        child.kill()
        child.wait()
        assert process_groups(child.pid, fd) == frozenset()
    finally:
        os.close(fd)
        if child.poll() is None:
            child.kill()


@pytest.mark.parametrize(
    ("listen", "tls", "insecure", "refused"),
    [
        ("", False, False, None),
        ("127.0.0.1:7000", False, True, None),
        ("[::1]:7000", False, True, None),
        ("localhost:7000", False, True, None),
        ("127.0.0.1:7000", False, False, "needs --insecure"),
        ("0.0.0.0:7000", False, True, "not a loopback address"),
        ("10.1.2.3:7000", False, False, "not a loopback address"),
        ("0.0.0.0:7000", True, False, None),
        ("0.0.0.0:7000", True, True, "exclude each other"),
        ("7000", False, True, "is not HOST:PORT"),
    ],
)
def test_tcp_listener_rules(listen: str, tls: bool, insecure: bool, refused: str | None) -> None:
    files = tls_files("c.pem", "k.pem", "ca.pem") if tls else None
    if refused is None:
        check_listener(listen, files, insecure)
    else:
        with pytest.raises(TransportError, match=refused):
            check_listener(listen, files, insecure)


def test_loopback_and_partial_tls() -> None:
    assert is_loopback("127.0.0.2") and is_loopback("::1")
    assert not is_loopback("192.0.2.1")
    with pytest.raises(TransportError, match="--tls-client-ca, --tls-key"):
        tls_files("c.pem", "", "")
    assert tls_files("", "", "") is None
