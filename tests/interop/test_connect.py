"""CONNECT / CONNACK rules of MQTT 3.1.1 (section 3.1, 3.2), checked byte for byte."""

import time

from clients import PahoClient, assert_healthy, mosquitto_pub, unique
from mqtt_raw import CONNACK, connect, mstr, packet


def test_connack_is_exact_bytes_for_accepted_clean_session(server, clients):
    c = clients.raw(server.mqtt_port)
    c.send(connect(unique("exact"), clean=True))
    c.sock.settimeout(5)
    assert c.sock.recv(4) == b"\x20\x02\x00\x00"


def test_zero_length_client_id_with_clean_session_is_accepted(server, clients):
    c = clients.raw(server.mqtt_port)
    ack = c.connect("", clean=True)
    assert ack.body == b"\x00\x00"
    # and it is a working connection
    assert c.subscribe([("zero/id", 1)]) == [1]


def test_two_zero_length_client_ids_get_distinct_sessions(server, clients):
    a = clients.raw(server.mqtt_port)
    a.connect("")
    b = clients.raw(server.mqtt_port)
    b.connect("")
    # neither took the other over
    time.sleep(0.3)
    assert a.is_open() and b.is_open()


def test_zero_length_client_id_with_clean_session_0_is_rejected_with_code_2(server, clients):
    c = clients.raw(server.mqtt_port)
    c.send(connect("", clean=False))
    ack = c.expect(CONNACK)
    assert ack.body == b"\x00\x02"  # identifier rejected [MQTT-3.1.3-8]
    c.expect_closed()


def test_protocol_level_3_with_name_mqtt_is_rejected_with_code_1(server, clients):
    c = clients.raw(server.mqtt_port)
    c.send(connect(unique("lvl3"), level=3))
    ack = c.expect(CONNACK)
    assert ack.body == b"\x00\x01"  # unacceptable protocol version [MQTT-3.1.2-2]
    c.expect_closed()


def test_unknown_protocol_level_is_rejected_with_code_1(server, clients):
    c = clients.raw(server.mqtt_port)
    c.send(connect(unique("lvl9"), level=9))
    ack = c.expect(CONNACK)
    assert ack.body == b"\x00\x01"
    c.expect_closed()
    assert_healthy(server)


def test_bad_protocol_name_closes_connection(server, clients):
    c = clients.raw(server.mqtt_port)
    c.send(connect(unique("name"), proto_name="MQTX"))
    seen = c.expect_closed()
    # [MQTT-3.1.2-1]: the server may disconnect; it must not accept the session
    assert all(not (p.type == CONNACK and p.body[1] == 0) for p in seen), seen
    assert_healthy(server)


def test_password_flag_without_username_flag_closes_connection(server, clients):
    c = clients.raw(server.mqtt_port)
    # flags: clean session + password (0x40), username flag 0 [MQTT-3.1.2-22]
    body = mstr("MQTT") + bytes([4, 0x42]) + b"\x00\x3c" + mstr(unique("pw")) + mstr("secret")
    c.send(packet(0x10, body))
    seen = c.expect_closed()
    assert all(not (p.type == CONNACK and p.body[1] == 0) for p in seen), seen
    assert_healthy(server)


def test_reserved_connect_flag_bit_closes_connection(server, clients):
    c = clients.raw(server.mqtt_port)
    c.send(connect(unique("rsv"), flags=0x03))  # bit 0 is reserved [MQTT-3.1.2-3]
    c.expect_closed()
    assert_healthy(server)


def test_will_qos_without_will_flag_closes_connection(server, clients):
    c = clients.raw(server.mqtt_port)
    c.send(connect(unique("wq"), flags=0x02 | 0x08))  # will QoS 1, will flag 0 [MQTT-3.1.2-13]
    seen = c.expect_closed()
    assert all(not (p.type == CONNACK and p.body[1] == 0) for p in seen), seen
    assert_healthy(server)


def test_will_qos_3_closes_connection(server, clients):
    c = clients.raw(server.mqtt_port)
    c.send(connect(unique("wq3"), will=("w/t", b"x", 3, False)))  # [MQTT-3.1.2-14]
    seen = c.expect_closed()
    assert all(not (p.type == CONNACK and p.body[1] == 0) for p in seen), seen
    assert_healthy(server)


def test_connack_session_present_0_for_clean_session(server, clients):
    cid = unique("sp")
    c = clients.raw(server.mqtt_port)
    assert c.connect(cid, clean=False).body == b"\x00\x00"  # no stored session yet [MQTT-3.2.2-3]
    c.subscribe([("sp/t", 1)])
    c.close()
    d = clients.raw(server.mqtt_port)
    # a stored session exists, but clean session 1 discards it [MQTT-3.2.2-1]
    assert d.connect(cid, clean=True).body == b"\x00\x00"


def test_connack_session_present_1_when_resuming_stored_session(server, clients):
    cid = unique("sp1")
    c = clients.raw(server.mqtt_port)
    c.connect(cid, clean=False)
    c.subscribe([("sp1/t", 1)])
    c.close()
    d = clients.raw(server.mqtt_port)
    assert d.connect(cid, clean=False).body == b"\x01\x00"  # [MQTT-3.2.2-2]


def test_clean_session_discards_previous_subscriptions(server, clients):
    cid = unique("discard")
    c = clients.raw(server.mqtt_port)
    c.connect(cid, clean=False)
    c.subscribe([("discard/t", 1)])
    c.close()
    d = clients.raw(server.mqtt_port)
    d.connect(cid, clean=True)
    p = clients.paho(server.mqtt_port)
    p.publish("discard/t", b"x", qos=1)
    d.expect_no_packet(0.5)


def test_connect_without_credentials_rejected_code_5_when_anonymous_not_allowed(start_server, clients):
    srv = start_server(anonymous=False)
    c = clients.raw(srv.mqtt_port)
    c.send(connect(unique("anon")))
    ack = c.expect(CONNACK)
    assert ack.body == b"\x00\x05"  # not authorized
    c.expect_closed()


def test_connect_with_unknown_credentials_rejected_when_anonymous_not_allowed(start_server, clients):
    srv = start_server(anonymous=False)
    c = clients.raw(srv.mqtt_port)
    c.send(connect("no-such-device", username="no-such-device", password="wrong"))
    ack = c.expect(CONNACK)
    assert ack.body[1] in (4, 5), ack  # bad user name or password / not authorized
    c.expect_closed()


def test_mosquitto_pub_without_credentials_fails_when_anonymous_not_allowed(start_server):
    srv = start_server(anonymous=False)
    res = mosquitto_pub(srv.mqtt_port, "x/y", "z", check=False)
    assert res.returncode != 0
    assert "authori" in (res.stdout + res.stderr).lower(), res


def test_paho_connect_refused_not_authorized_when_anonymous_not_allowed(start_server):
    srv = start_server(anonymous=False)
    p = PahoClient(srv.mqtt_port, client_id=unique("paho-anon"))
    try:
        p.connect(expect_success=False)
        assert p.connect_rc is not None and p.connect_rc.is_failure
        assert "authori" in str(p.connect_rc).lower(), str(p.connect_rc)
    finally:
        p.close()


def test_will_topic_with_wildcard_not_accepted(server, clients):
    c = clients.raw(server.mqtt_port)
    c.send(connect(unique("willwild"), will=("will/#", b"x", 0, False)))
    seen = c.expect_closed()  # a will topic is a topic name: no wildcards [MQTT-4.7.1-1]
    assert all(not (p.type == CONNACK and p.body[1] == 0) for p in seen), seen
    assert_healthy(server)


def test_23_character_alphanumeric_client_id_accepted(server, clients):
    c = clients.raw(server.mqtt_port)
    assert c.connect("Abcdefghij0123456789XYZ").body == b"\x00\x00"  # [MQTT-3.1.3-5]


def test_long_utf8_client_id_accepted(server, clients):
    c = clients.raw(server.mqtt_port)
    assert c.connect("capteur-température-" + "x" * 40).body == b"\x00\x00"
