"""Quotas by verified identity, durable SetQuotas, and the default share.

Real broker processes and restarts. Over the Unix socket the client library does the
peer handshake, so the identity is this test's uid; certificate identities are in
test_tls.py, another uid in test_other_uid.py.
"""

from __future__ import annotations

import os
from collections.abc import Callable

import pytest
from pasid_client import Client, QuotaExceeded

from tests.harness import BrokerProcess, open_db


def test_renaming_or_more_sessions_do_not_escape_the_identity_quota(
    make_broker: Callable[..., BrokerProcess],
) -> None:
    b = make_broker("--quota-per-identity", "5")
    with Client(b.address) as c, c.session("vm-a") as a, c.session("vm-b") as x:
        assert a.alloc(1, 100, 3) == [1, 2, 3]
        with pytest.raises(QuotaExceeded) as e:
            x.alloc(1, 100, 3)
        assert (e.value.quota, e.value.limit) == ("client", 5)
        assert f"uid:{os.getuid()} holds 3 across its sets" in e.value.message
        assert x.alloc(1, 100, 2) == [4, 5]
        assert c.info().in_use == 5


def test_default_identity_quota_is_a_quarter_of_the_capacity(
    make_broker: Callable[..., BrokerProcess],
) -> None:
    b = make_broker()
    with Client(b.address) as c:
        i = c.info()
        assert i.quotas.per_client == i.capacity // 4


def test_set_quotas_outlive_a_restart(make_broker: Callable[..., BrokerProcess]) -> None:
    """Defaults and one set's quota, changed by SetQuotas, are in force after a restart
    (the flags, unchanged, only seed an empty table); recovered sets still count for their
    identity."""
    b = make_broker("--quota-per-set", "100", "--quota-per-identity", "50")
    with Client(b.address) as c, Client(b.admin_address) as admin:
        s = c.session("held", grace_seconds=60)
        s.alloc(1, 1000, 4)
        admin.set_quotas(per_set=20, per_client=6, global_=500)
        admin.set_quotas(per_set=5, set_id=s.set_id)
        token = s.token
        # Its stream broken, not released (close() would destroy it, issue 19): detached,
        # kept across the restart while its holder, this process, lives.
        s.detach()
    b.restart()
    with Client(b.address) as c:
        q = c.info().quotas
        assert (q.per_set, q.per_client, q.global_) == (20, 6, 500)
        with c.session(resume_token=token) as s:
            assert s.quota == 5 and s.resumed
            with pytest.raises(QuotaExceeded) as e:
                s.alloc(1, 1000, 2)  # 6 > the set's 5
            assert e.value.quota == "set"
            with c.session("other") as o:
                with pytest.raises(QuotaExceeded) as e:
                    o.alloc(1, 1000, 3)  # the identity holds 4 (recovered) + 3 > 6
                assert e.value.quota == "client"
                assert o.alloc(1, 1000, 2) == [5, 6]
    with open_db(b.db) as con:
        rows = con.execute("SELECT scope, per_set, per_client, global_ FROM quotas").fetchall()
        assert rows == [("default", 20, 6, 500)]
