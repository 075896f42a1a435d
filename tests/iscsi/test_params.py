"""Operational key negotiation: every key, its combining rule, and the rejections."""

import pytest

from services.iscsi_target.params import (
    TARGET_FIRST_BURST, TARGET_MAX_BURST, TARGET_MAX_RECV_DATA, Negotiation, NegotiationError,
)


def answer(offers, **kw):
    n = Negotiation(**kw)
    return dict(n.respond(list(offers.items()))), n


@pytest.mark.parametrize("key", ["HeaderDigest", "DataDigest"])
def test_digest_lists_pick_first_supported(key):
    got, n = answer({key: "CRC32C,None"})
    assert got[key] == "CRC32C"
    got, n = answer({key: "None,CRC32C"})
    assert got[key] == "None"
    got, _ = answer({key: "MD5"})
    assert got[key] == "Reject"


def test_numeric_min_keys():
    got, n = answer({"MaxBurstLength": "99999999", "FirstBurstLength": "4096", "MaxOutstandingR2T": "8",
                     "MaxConnections": "4", "ErrorRecoveryLevel": "2", "DefaultTime2Retain": "60"})
    assert got["MaxBurstLength"] == "Reject"  # out of range (> 2^24-1)
    assert got["FirstBurstLength"] == "4096"
    assert got["MaxOutstandingR2T"] == "1"
    assert got["MaxConnections"] == "1"
    assert got["ErrorRecoveryLevel"] == "0"
    assert got["DefaultTime2Retain"] == "20"
    got, n = answer({"MaxBurstLength": "1048576", "FirstBurstLength": "1048576"})
    assert got["MaxBurstLength"] == "1048576"
    assert got["FirstBurstLength"] == str(min(1048576, TARGET_FIRST_BURST))
    got, n = answer({"MaxBurstLength": str(TARGET_MAX_BURST + 512)})
    assert got["MaxBurstLength"] == str(TARGET_MAX_BURST)


def test_first_burst_never_exceeds_max_burst():
    _, n = answer({"MaxBurstLength": "8192", "FirstBurstLength": "65536"})
    assert n.values["FirstBurstLength"] == 8192


def test_numeric_max_key():
    got, _ = answer({"DefaultTime2Wait": "0"})
    assert got["DefaultTime2Wait"] == "2"
    got, _ = answer({"DefaultTime2Wait": "5"})
    assert got["DefaultTime2Wait"] == "5"


def test_boolean_and_or_keys():
    got, n = answer({"InitialR2T": "No", "ImmediateData": "Yes", "DataPDUInOrder": "No", "DataSequenceInOrder": "Yes"})
    assert got == {"InitialR2T": "No", "ImmediateData": "Yes", "DataPDUInOrder": "Yes", "DataSequenceInOrder": "Yes"}
    got, n = answer({"InitialR2T": "Yes", "ImmediateData": "No"})
    assert got == {"InitialR2T": "Yes", "ImmediateData": "No"}
    assert n.values["InitialR2T"] is True and n.values["ImmediateData"] is False
    got, _ = answer({"InitialR2T": "maybe"})
    assert got["InitialR2T"] == "Reject"


def test_max_recv_data_segment_length_is_declarative():
    got, n = answer({"MaxRecvDataSegmentLength": "65536"})
    assert "MaxRecvDataSegmentLength" not in got
    assert n.initiator_max_recv == 65536
    assert n.declarations() == [("MaxRecvDataSegmentLength", str(TARGET_MAX_RECV_DATA))]
    assert n.declarations() == []


def test_markers_unknown_and_discovery_irrelevant():
    got, _ = answer({"IFMarker": "Yes", "OFMarkInt": "1", "X-com.example.Foo": "1"})
    assert got == {"IFMarker": "No", "OFMarkInt": "Irrelevant", "X-com.example.Foo": "NotUnderstood"}
    got, _ = answer({"MaxBurstLength": "262144", "ImmediateData": "Yes"}, discovery=True)
    assert got == {"MaxBurstLength": "Irrelevant", "ImmediateData": "Irrelevant"}


def test_full_feature_phase_rejects_login_only_keys():
    n = Negotiation()
    got = dict(n.respond([("MaxBurstLength", "4096"), ("MaxRecvDataSegmentLength", "16384")], full_feature=True))
    assert got == {"MaxBurstLength": "Reject"}
    assert n.initiator_max_recv == 16384


def test_malformed_pairs():
    with pytest.raises(NegotiationError):
        Negotiation().respond([("MaxBurstLength", None)])
    got, _ = answer({"MaxBurstLength": "lots"})
    assert got["MaxBurstLength"] == "Reject"
