"""The sans-IO handshake admission core in virtual time (test_handshake_flood: the real one)."""

from __future__ import annotations

from dwcp.transport.admission import Admission, AdmissionLimits, Verdict

from .helpers import two_keys


def test_admission_asks_for_retry_under_load_and_caps_pending_per_proven_address() -> None:
    limits = AdmissionLimits(retry_above=2, max_pending=6, per_address=2, rate_per_address=1)
    adm = Admission(limits)
    t = 0.0
    assert adm.admit("10.0.0.1", False, t) is Verdict.ACCEPT  # quiet: no proof needed
    unproven = adm.open("10.0.0.1", False)
    assert adm.admit("10.0.0.1", False, t) is Verdict.ACCEPT
    adm.open("10.0.0.1", False)
    assert adm.admit("10.0.0.1", False, t) is Verdict.RETRY  # 2 pending: prove the address
    assert adm.admit("10.0.0.9", False, t) is Verdict.RETRY
    # Unproven connections do not count against their (maybe spoofed) address.
    for _ in range(2):
        assert adm.admit("10.0.0.1", True, t) is Verdict.ACCEPT
        adm.open("10.0.0.1", True)
    assert adm.admit("10.0.0.1", True, t) is Verdict.DROP  # 2 proven pending from there
    for ip in ("10.0.0.2", "10.0.0.3"):
        assert adm.admit(ip, True, t) is Verdict.ACCEPT
        adm.open(ip, True)
    assert adm.admit("10.0.0.4", True, t) is Verdict.DROP  # 6 pending in all
    adm.release(unproven)
    assert adm.admit("10.0.0.4", True, t) is Verdict.ACCEPT
    assert adm.stats.pending == 5 and adm.stats.most_pending == 6
    assert adm.stats.retries == 2 and adm.stats.dropped == 2


def test_admission_rate_limits_handshakes_per_address_in_virtual_time() -> None:
    adm = Admission(AdmissionLimits(retry_above=100, per_address=4, rate_per_address=2.0))
    verdicts = []
    for _ in range(10):  # ten handshakes at once, each finishing at once
        v = adm.admit("10.0.0.9", True, 0.0)
        verdicts.append(v)
        if v is Verdict.ACCEPT:
            adm.release(adm.open("10.0.0.9", True))
    assert verdicts.count(Verdict.ACCEPT) == 4  # the burst
    assert adm.admit("10.0.0.9", True, 0.25) is Verdict.DROP  # half a token
    assert adm.admit("10.0.0.9", True, 0.5) is Verdict.ACCEPT  # one token per 0.5 s


def test_admission_limits_connections_and_sessions_per_proven_key() -> None:
    _, b = two_keys()
    adm = Admission(AdmissionLimits(per_key=3, sessions_per_key=2))
    tickets = [adm.open("10.0.0.1", True) for _ in range(5)]
    assert adm.join(tickets[0], b.public, new_session=True)
    assert adm.join(tickets[1], b.public, new_session=True)
    assert not adm.join(tickets[2], b.public, new_session=True)  # a third session
    assert adm.join(tickets[2], b.public, new_session=False)
    assert not adm.join(tickets[3], b.public, new_session=False)  # a fourth connection
    assert adm.stats.pending == 2 and adm.stats.joined == 3 and adm.stats.refused_keys == 2
    adm.release(tickets[0])
    assert adm.join(tickets[3], b.public, new_session=True)
    for ticket in tickets[1:]:
        adm.release(ticket)
    assert adm.stats.pending == 0 and adm.stats.joined == 0
