"""The events' wire shape: the type strings and fields the controller reads (services/controller/fleet.py)."""

from services.iscsi_target import events as ev
from shared import events as bus


def test_types_and_fields_on_the_wire():
    login = ev.Login(ip="10.0.0.5", initiator="iqn.i", target="iqn.t", isid="0x800000000001", tsih=1,
                     session_type="Normal", auth="None", user="", reinstated=False, header_digest="None",
                     data_digest="None")
    assert login.type == bus.ISCSI_LOGIN == "iscsi.login" and not login.local
    assert list(login.fields()) == ["ip", "initiator", "target", "isid", "tsih", "session_type", "auth", "user",
                                    "reinstated", "header_digest", "data_digest"]
    assert ev.LoginFailed.type == "iscsi.login.failed" and ev.Logout.type == "iscsi.logout"
    assert ev.FirstRead.type == "iscsi.first_read" and ev.IoStats.type == "iscsi.io_stats"


def test_mac_is_sent_only_when_known():
    logout = ev.Logout(ip="10.0.0.5", initiator="iqn.i", target="iqn.t", tsih=3, reason="logout")
    assert "mac" not in logout.fields()
    with_mac = logout.with_mac("52:54:00:00:00:01")
    assert with_mac.fields() == {"ip": "10.0.0.5", "initiator": "iqn.i", "target": "iqn.t", "tsih": 3,
                                 "reason": "logout", "mac": "52:54:00:00:00:01"}
    assert "mac" not in logout.fields()  # frozen: the original is unchanged


def test_local_events_stay_in_the_process():
    assert ev.Error(where="nexus_lost", error="boom").local
    assert ev.SessionEnd(session=None).local
