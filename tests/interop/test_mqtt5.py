"""MQTT 5.0 broker behaviour with real v5 clients (paho-mqtt 2.x MQTTv5, mosquitto -V mqttv5):
properties and message expiry, session expiry, CONNACK capabilities, flow control, topic
aliases, packet size, subscription options and identifiers, shared subscriptions, will
delay, server DISCONNECT reason codes, AUTH and acknowledgement reason codes."""

from __future__ import annotations

import queue
import struct
import subprocess
import threading
import time
import uuid

import paho.mqtt.client as mqtt
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.subscribeoptions import SubscribeOptions

import mqtt_raw as raw

PROTOCOL_ERROR = 0x82


def unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


def props(kind, **kw) -> Properties:
    p = Properties(kind)
    for k, v in kw.items():
        setattr(p, k, v)
    return p


class C5:
    """A paho MQTT 5.0 client with queues for what arrives."""

    def __init__(self, port, client_id=None, clean_start=True, properties=None, will=None,
                 keepalive=60, manual_ack=False, connect=True, expect_success=True):
        self.c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2,
                             client_id=unique("c5") if client_id is None else client_id,
                             protocol=mqtt.MQTTv5, reconnect_on_failure=False, manual_ack=manual_ack)
        if will is not None:
            topic, payload, qos, wprops = will
            self.c.will_set(topic, payload, qos=qos, properties=wprops)
        self.port, self.clean_start, self.properties, self.keepalive = port, clean_start, properties, keepalive
        self.messages: queue.Queue = queue.Queue()
        self.connected = threading.Event()
        self.disconnected = threading.Event()
        self.reason = self.flags = self.connack_props = self.disconnect_reason = None
        self.subacks: dict = {}
        self.pubacks: dict = {}
        self.cond = threading.Condition()

        def on_connect(c, u, flags, reason, p):
            self.reason, self.flags, self.connack_props = reason, flags, p
            self.connected.set()

        def on_disconnect(c, u, flags, reason, p):
            self.disconnect_reason = reason
            self.disconnected.set()
            self.connected.set()

        def on_subscribe(c, u, mid, codes, p):
            with self.cond:
                self.subacks[mid] = codes
                self.cond.notify_all()

        def on_publish(c, u, mid, reason, p):
            with self.cond:
                self.pubacks[mid] = reason
                self.cond.notify_all()

        self.c.on_connect = on_connect
        self.c.on_disconnect = on_disconnect
        self.c.on_message = lambda c, u, m: self.messages.put(m)
        self.c.on_subscribe = on_subscribe
        self.c.on_publish = on_publish
        if connect:
            self.connect(expect_success)

    def connect(self, expect_success=True):
        self.connected.clear()
        self.c.connect("127.0.0.1", self.port, keepalive=self.keepalive, clean_start=self.clean_start,
                       properties=self.properties)
        self.c.loop_start()
        assert self.connected.wait(5), "no CONNACK"
        if expect_success:
            assert self.reason is not None and not self.reason.is_failure, self.reason

    def _wait(self, d, mid, timeout=5):
        with self.cond:
            assert self.cond.wait_for(lambda: mid in d, timeout), "no acknowledgement"
            return d[mid]

    def subscribe(self, topic, qos=0, options=None, properties=None):
        opts = options or SubscribeOptions(qos=qos)
        _, mid = self.c.subscribe(topic, options=opts, properties=properties)
        return self._wait(self.subacks, mid)

    def publish(self, topic, payload=b"", qos=0, retain=False, properties=None):
        info = self.c.publish(topic, payload, qos=qos, retain=retain, properties=properties)
        if qos == 0:
            return None
        return self._wait(self.pubacks, info.mid)

    def get(self, timeout=5.0):
        return self.messages.get(timeout=timeout)

    def drain(self, within=0.7):
        out, end = [], time.monotonic() + within
        while True:
            try:
                out.append(self.messages.get(timeout=max(0.01, end - time.monotonic())))
            except queue.Empty:
                return out

    def disconnect(self, reason=None, properties=None):
        if reason is None:
            self.c.disconnect(properties=properties)
        else:
            self.c.disconnect(reasoncode=mqtt.ReasonCode(PacketTypes.DISCONNECT, identifier=reason),
                              properties=properties)
        self.disconnected.wait(5)
        self.c.loop_stop()

    def drop(self):
        """Loses the connection without DISCONNECT."""
        self.c.loop_stop()
        self.c.socket().close()


def sub_ids(m):
    return list(getattr(m.properties, "SubscriptionIdentifier", []) or [])


# ---------------------------------------------------------------- 1. properties, expiry, aliases

def test_publish_properties_reach_v5_subscribers_in_order(server):
    sub = C5(server.mqtt_port)
    sub.subscribe("p5/t", 1)
    pub = C5(server.mqtt_port)
    p = props(PacketTypes.PUBLISH, PayloadFormatIndicator=1, ContentType="text/plain",
              ResponseTopic="p5/reply", CorrelationData=b"\x01\x02",
              UserProperty=[("b", "2"), ("a", "1"), ("b", "3")])
    pub.publish("p5/t", b"hi", qos=1, properties=p)
    m = sub.get()
    assert m.payload == b"hi"
    assert m.properties.PayloadFormatIndicator == 1
    assert m.properties.ContentType == "text/plain"
    assert m.properties.ResponseTopic == "p5/reply"
    assert m.properties.CorrelationData == b"\x01\x02"
    assert m.properties.UserProperty == [("b", "2"), ("a", "1"), ("b", "3")]
    assert not hasattr(m.properties, "MessageExpiryInterval")


def test_message_expiry_is_decremented_and_expired_messages_are_dropped(server):
    cid = unique("exp")
    session = props(PacketTypes.CONNECT, SessionExpiryInterval=300)
    sub = C5(server.mqtt_port, client_id=cid, clean_start=True, properties=session)
    sub.subscribe("exp/t", 1)
    sub.disconnect()
    pub = C5(server.mqtt_port)
    pub.publish("exp/t", b"short", qos=1, properties=props(PacketTypes.PUBLISH, MessageExpiryInterval=1))
    pub.publish("exp/t", b"long", qos=1, properties=props(PacketTypes.PUBLISH, MessageExpiryInterval=60))
    pub.publish("exp/r", b"ret", qos=1, retain=True, properties=props(PacketTypes.PUBLISH, MessageExpiryInterval=1))
    time.sleep(2.2)
    sub = C5(server.mqtt_port, client_id=cid, clean_start=False, properties=session)
    got = sub.drain(1.0)
    assert [m.payload for m in got] == [b"long"], "the expired queued message is dropped"
    assert 55 <= got[0].properties.MessageExpiryInterval <= 58, "remaining interval forwarded"
    late = C5(server.mqtt_port)
    late.subscribe("exp/r", 1)
    assert late.drain(0.7) == [], "the expired retained message is gone"


def test_topic_aliases_from_the_client_are_resolved_and_not_forwarded(server):
    sub = C5(server.mqtt_port)
    sub.subscribe("alias/t", 0)
    c = raw.RawClient(server.mqtt_port)
    c.send(raw.packet(0x10, raw.mstr("MQTT") + bytes([5, 2]) + struct.pack("!H", 60) + b"\x00" + raw.mstr("al")))
    assert c.recv_packet().name == "CONNACK"
    alias = b"\x03\x23\x00\x01"  # properties: Topic Alias 1
    c.send(raw.packet(0x30, raw.mstr("alias/t") + alias + b"one"))
    c.send(raw.packet(0x30, raw.mstr("") + alias + b"two"))
    got = [sub.get(), sub.get()]
    assert [(m.topic, m.payload) for m in got] == [("alias/t", b"one"), ("alias/t", b"two")]
    assert all(not hasattr(m.properties, "TopicAlias") for m in got)


def test_topic_aliases_to_the_client_up_to_its_maximum(server):
    """Server → client aliases (§3.3.2.3.4): a topic's first PUBLISH carries topic and alias,
    later ones the alias alone; never more aliases than the client's Topic Alias Maximum."""
    c = raw.RawClient(server.mqtt_port)
    alias_max = b"\x03\x22\x00\x01"  # CONNECT properties: Topic Alias Maximum 1
    c.send(raw.packet(0x10, raw.mstr("MQTT") + bytes([5, 2]) + struct.pack("!H", 60) + alias_max + raw.mstr("alo")))
    assert c.recv_packet().name == "CONNACK"
    c.send(raw.packet(0x82, struct.pack("!H", 1) + b"\x00" + raw.mstr("alo/#") + b"\x00"))
    assert c.recv_packet().name == "SUBACK"
    p = C5(server.mqtt_port)
    for t in ("alo/x", "alo/x", "alo/y"):
        p.publish(t, b"p", qos=0)
    bodies = [c.expect(raw.PUBLISH).body for _ in range(3)]
    alias1 = b"\x03\x23\x00\x01"  # properties: Topic Alias 1
    assert bodies[0] == raw.mstr("alo/x") + alias1 + b"p"
    assert bodies[1] == raw.mstr("") + alias1 + b"p"
    assert bodies[2] == raw.mstr("alo/y") + b"\x00" + b"p"  # maximum reached: no alias
    p.disconnect()


def test_v311_subscriber_gets_v5_messages_without_properties(server, clients):
    old = clients.paho(server.mqtt_port)
    old.subscribe("mix5/t", 1)
    pub = C5(server.mqtt_port)
    pub.publish("mix5/t", b"v5", qos=1, properties=props(PacketTypes.PUBLISH, ContentType="a/b",
                                                           UserProperty=[("k", "v")], MessageExpiryInterval=30))
    m = old.get()
    assert (m.topic, m.payload, m.qos) == ("mix5/t", b"v5", 1)
    # The 3.1.1 packet has no property section: paho leaves the message without properties.
    assert m.properties is None or not m.properties.json()


# ---------------------------------------------------------------- 2. CONNECT/CONNACK

def test_connack_advertises_capabilities(server):
    c = C5(server.mqtt_port)
    p = c.connack_props
    assert p.ReceiveMaximum == 1024
    assert p.TopicAliasMaximum == 64
    assert p.MaximumPacketSize == 1024 * 1024
    assert p.RetainAvailable == 1
    assert p.WildcardSubscriptionAvailable == 1
    assert p.SubscriptionIdentifierAvailable == 1
    assert p.SharedSubscriptionAvailable == 1
    assert not hasattr(p, "MaximumQoS")


def test_assigned_client_identifier_for_an_empty_id(server):
    c = C5(server.mqtt_port, client_id="")
    assert c.connack_props.AssignedClientIdentifier.startswith("stratus-")


def test_session_expiry_keeps_then_drops_the_session(server):
    cid = unique("se")
    two = props(PacketTypes.CONNECT, SessionExpiryInterval=2)
    c = C5(server.mqtt_port, client_id=cid, properties=two)
    c.subscribe("se/t", 1)
    c.disconnect()
    c = C5(server.mqtt_port, client_id=cid, clean_start=False, properties=two)
    assert c.flags.session_present, "resumed within the interval"
    c.disconnect()
    time.sleep(3.0)
    c = C5(server.mqtt_port, client_id=cid, clean_start=False, properties=two)
    assert not c.flags.session_present, "the expired session was dropped"


def test_session_expiry_zero_ends_the_session_and_disconnect_cannot_raise_it(server):
    cid = unique("se0")
    c = C5(server.mqtt_port, client_id=cid)
    c.subscribe("se0/t", 1)
    c.disconnect(properties=props(PacketTypes.DISCONNECT, SessionExpiryInterval=60))
    assert c.disconnect_reason is not None
    c = C5(server.mqtt_port, client_id=cid, clean_start=False)
    assert not c.flags.session_present


def test_disconnect_may_extend_a_nonzero_session_expiry(server):
    cid = unique("sed")
    c = C5(server.mqtt_port, client_id=cid, properties=props(PacketTypes.CONNECT, SessionExpiryInterval=1))
    c.subscribe("sed/t", 1)
    c.disconnect(properties=props(PacketTypes.DISCONNECT, SessionExpiryInterval=60))
    time.sleep(2.0)
    c = C5(server.mqtt_port, client_id=cid, clean_start=False)
    assert c.flags.session_present


def test_server_keep_alive_overrides_a_longer_keep_alive(start_server):
    srv = start_server(config="[mqtt]\nmax_keepalive = 5\n")
    c = C5(srv.mqtt_port, keepalive=60)
    assert c.connack_props.ServerKeepAlive == 5
    short = C5(srv.mqtt_port, keepalive=3)
    assert not hasattr(short.connack_props, "ServerKeepAlive")


def test_receive_maximum_limits_messages_in_flight_to_the_client(server):
    sub = C5(server.mqtt_port, manual_ack=True, properties=props(PacketTypes.CONNECT, ReceiveMaximum=2))
    sub.subscribe("rm/t", 1)
    pub = C5(server.mqtt_port)
    for i in range(5):
        pub.publish("rm/t", str(i).encode(), qos=1)
    first = sub.drain(1.0)
    assert len(first) == 2, "no more than the client's Receive Maximum in flight"
    for m in first:
        sub.c.ack(m.mid, m.qos)
    rest = sub.drain(1.0)
    assert len(rest) == 2


def test_exceeding_the_server_receive_maximum_is_disconnected_with_0x93(start_server):
    srv = start_server(config="[mqtt]\nreceive_maximum = 2\n")
    c = raw.RawClient(srv.mqtt_port)
    c.send(raw.packet(0x10, raw.mstr("MQTT") + bytes([5, 2]) + struct.pack("!H", 60) + b"\x00" + raw.mstr("rmx")))
    ack = c.recv_packet()
    assert ack.name == "CONNACK"
    pubs = b"".join(raw.packet(0x32, raw.mstr("rmx/t") + struct.pack("!H", i) + b"\x00" + b"x") for i in (1, 2, 3))
    c.send(pubs)
    seen = []
    try:
        while True:
            seen.append(c.recv_packet(3))
    except Exception:
        pass
    disc = [p for p in seen if p.name == "DISCONNECT"]
    assert disc and disc[0].body[0] == 0x93, seen


def test_maximum_packet_size_of_the_client_is_respected(server):
    sub = C5(server.mqtt_port, properties=props(PacketTypes.CONNECT, MaximumPacketSize=200))
    sub.subscribe("mps/t", 1)
    pub = C5(server.mqtt_port)
    pub.publish("mps/t", b"x" * 500, qos=1)
    pub.publish("mps/t", b"small", qos=1)
    assert [m.payload for m in sub.drain(1.0)] == [b"small"]


def test_oversized_packet_gets_disconnect_0x95(start_server):
    srv = start_server(config="[mqtt]\nmax_packet_size = 1024\n")
    c = C5(srv.mqtt_port)
    assert c.connack_props.MaximumPacketSize == 1024
    c.c.publish("big/t", b"x" * 4000)
    assert c.disconnected.wait(5)
    assert c.disconnect_reason.value == 0x95


def test_topic_alias_above_the_maximum_gets_disconnect_0x94(server):
    c = C5(server.mqtt_port)
    c.c.publish("ta/t", b"x", properties=props(PacketTypes.PUBLISH, TopicAlias=65))
    assert c.disconnected.wait(5)
    assert c.disconnect_reason.value == 0x94


# ---------------------------------------------------------------- 3. subscription options

def test_no_local_skips_the_publishers_own_connection(server):
    c = C5(server.mqtt_port)
    c.subscribe("nl/t", options=SubscribeOptions(qos=1, noLocal=True))
    other = C5(server.mqtt_port)
    other.subscribe("nl/t", 1)
    c.publish("nl/t", b"mine", qos=1)
    assert other.get().payload == b"mine"
    assert c.drain(0.7) == []


def test_retain_as_published_keeps_the_retain_flag(server):
    rap = C5(server.mqtt_port)
    rap.subscribe("rap/t", options=SubscribeOptions(qos=0, retainAsPublished=True))
    plain = C5(server.mqtt_port)
    plain.subscribe("rap/t", 0)
    pub = C5(server.mqtt_port)
    pub.publish("rap/t", b"r", qos=1, retain=True)
    assert rap.get().retain is True
    assert plain.get().retain is False


def test_retain_handling_0_1_2(server):
    pub = C5(server.mqtt_port)
    pub.publish("rh/t", b"kept", qos=1, retain=True)
    c0 = C5(server.mqtt_port)
    c0.subscribe("rh/t", options=SubscribeOptions(qos=0, retainHandling=0))
    assert c0.get().payload == b"kept"
    c0.subscribe("rh/t", options=SubscribeOptions(qos=0, retainHandling=0))
    assert c0.get().payload == b"kept", "0: on every subscribe"
    c1 = C5(server.mqtt_port)
    c1.subscribe("rh/t", options=SubscribeOptions(qos=0, retainHandling=1))
    assert c1.get().payload == b"kept"
    c1.subscribe("rh/t", options=SubscribeOptions(qos=0, retainHandling=1))
    assert c1.drain(0.7) == [], "1: only for a new subscription"
    c2 = C5(server.mqtt_port)
    c2.subscribe("rh/t", options=SubscribeOptions(qos=0, retainHandling=2))
    assert c2.drain(0.7) == [], "2: never"


def test_subscription_identifiers_are_sent_with_matching_messages(server):
    c = C5(server.mqtt_port)
    c.subscribe("sid/+", 1, properties=props(PacketTypes.SUBSCRIBE, SubscriptionIdentifier=5))
    c.subscribe("sid/#", 1, properties=props(PacketTypes.SUBSCRIBE, SubscriptionIdentifier=9))
    c.subscribe("other", 1)
    pub = C5(server.mqtt_port)
    pub.publish("sid/a", b"1", qos=1)
    pub.publish("other", b"2", qos=1)
    got = c.drain(1.0)
    assert len(got) == 2, "one delivery for overlapping subscriptions"
    assert sorted(sub_ids(got[0])) == [5, 9]
    assert sub_ids(got[1]) == []


# ---------------------------------------------------------------- 4. shared subscriptions

def test_shared_subscription_round_robins_among_members(server):
    a, b = C5(server.mqtt_port), C5(server.mqtt_port)
    a.subscribe("$share/g/sh/t", 1)
    b.subscribe("$share/g/sh/t", 1)
    pub = C5(server.mqtt_port)
    for i in range(10):
        pub.publish("sh/t", str(i).encode(), qos=1)
    ga, gb = a.drain(1.0), b.drain(1.0)
    assert len(ga) == 5 and len(gb) == 5
    assert sorted(int(m.payload) for m in ga + gb) == list(range(10))


def test_shared_subscriptions_get_no_retained_messages(server):
    pub = C5(server.mqtt_port)
    pub.publish("shr/t", b"old", qos=1, retain=True)
    a = C5(server.mqtt_port)
    a.subscribe("$share/g/shr/t", 1)
    assert a.drain(0.7) == []


def test_shared_member_leaving_with_messages_in_flight_has_them_redelivered(server):
    lazy = C5(server.mqtt_port, manual_ack=True)
    lazy.subscribe("$share/g/shd/t", 1)
    pub = C5(server.mqtt_port)
    pub.publish("shd/t", b"0", qos=1)
    assert lazy.get().payload == b"0"  # never acknowledged
    other = C5(server.mqtt_port)
    other.subscribe("$share/g/shd/t", 1)
    lazy.disconnect()
    assert other.get().payload == b"0"


def test_no_local_on_a_shared_subscription_is_a_protocol_error(server):
    c = C5(server.mqtt_port)
    c.c.subscribe("$share/g/x", options=SubscribeOptions(qos=0, noLocal=True))
    assert c.disconnected.wait(5)
    assert c.disconnect_reason.value == PROTOCOL_ERROR


def test_invalid_shared_filter_is_refused_with_0x8f(server):
    c = C5(server.mqtt_port)
    codes = c.subscribe("$share//x", 0)
    assert codes[0].value == 0x8F


# ---------------------------------------------------------------- 5. will delay

def will(topic, delay):
    return (topic, b"gone", 1, props(PacketTypes.WILLMESSAGE, WillDelayInterval=delay))


def test_will_is_published_after_the_delay(server):
    watcher = C5(server.mqtt_port)
    watcher.subscribe("wd/t", 1)
    c = C5(server.mqtt_port, will=will("wd/t", 2),
           properties=props(PacketTypes.CONNECT, SessionExpiryInterval=60))
    c.drop()
    assert watcher.drain(1.0) == []
    assert watcher.get(4).payload == b"gone"


def test_reconnect_within_the_will_delay_cancels_the_will(server):
    watcher = C5(server.mqtt_port)
    watcher.subscribe("wdc/t", 1)
    cid = unique("wdc")
    sess = props(PacketTypes.CONNECT, SessionExpiryInterval=60)
    c = C5(server.mqtt_port, client_id=cid, will=will("wdc/t", 2), properties=sess)
    c.drop()
    time.sleep(0.5)
    C5(server.mqtt_port, client_id=cid, clean_start=False, properties=sess)
    assert watcher.drain(3.0) == []


def test_will_is_published_when_the_session_ends_before_the_delay(server):
    watcher = C5(server.mqtt_port)
    watcher.subscribe("wds/t", 1)
    c = C5(server.mqtt_port, will=will("wds/t", 30))  # session expiry 0
    c.drop()
    assert watcher.get(3).payload == b"gone"


def test_disconnect_with_will_message_publishes_the_will(server):
    watcher = C5(server.mqtt_port)
    watcher.subscribe("wd4/t", 1)
    c = C5(server.mqtt_port, will=("wd4/t", b"bye", 1, None))
    c.disconnect(reason=0x04)
    assert watcher.get(3).payload == b"bye"


# ---------------------------------------------------------------- 6. server DISCONNECT

def test_takeover_sends_disconnect_0x8e(server):
    cid = unique("to")
    first = C5(server.mqtt_port, client_id=cid)
    C5(server.mqtt_port, client_id=cid)
    assert first.disconnected.wait(5)
    assert first.disconnect_reason.value == 0x8E


def test_protocol_error_sends_disconnect_0x82(server):
    c = raw.RawClient(server.mqtt_port)
    c.send(raw.packet(0x10, raw.mstr("MQTT") + bytes([5, 2]) + struct.pack("!H", 60) + b"\x00" + raw.mstr("pe")))
    assert c.recv_packet().name == "CONNACK"
    c.send(raw.packet(0x10, raw.mstr("MQTT") + bytes([5, 2]) + struct.pack("!H", 60) + b"\x00" + raw.mstr("pe")))
    d = c.recv_packet()
    assert d.name == "DISCONNECT" and d.body[0] == 0x82


def test_publish_with_a_subscription_identifier_gets_disconnect_0x82(server):
    """MQTT-3.3.4-6: a PUBLISH from a client must not carry a Subscription Identifier. paho
    lets a caller put one in; the broker answers DISCONNECT 0x82 and routes nothing."""
    sub = C5(server.mqtt_port)
    sub.subscribe("sidpub/#", 1)
    c = C5(server.mqtt_port)
    c.c.publish("sidpub/t", b"x", qos=1, properties=props(PacketTypes.PUBLISH, SubscriptionIdentifier=3))
    assert c.disconnected.wait(5)
    assert c.disconnect_reason.value == PROTOCOL_ERROR
    # Byte-exact too, QoS 0: properties = Subscription Identifier (0x0B) 1.
    r = raw.RawClient(server.mqtt_port)
    r.send(raw.packet(0x10, raw.mstr("MQTT") + bytes([5, 2]) + struct.pack("!H", 60) + b"\x00" + raw.mstr("sidraw")))
    assert r.recv_packet().name == "CONNACK"
    r.send(raw.packet(0x30, raw.mstr("sidpub/raw") + b"\x02\x0b\x01" + b"payload"))
    d = r.recv_packet()
    assert d.name == "DISCONNECT" and d.body[0] == PROTOCOL_ERROR
    assert sub.drain(0.7) == [], "the message was routed"
    # The server's own deliveries still carry identifiers (SUBSCRIBE with one, then a publish).
    s2 = C5(server.mqtt_port)
    s2.subscribe("sidok/t", 1, properties=props(PacketTypes.SUBSCRIBE, SubscriptionIdentifier=4))
    C5(server.mqtt_port).publish("sidok/t", b"ok", qos=1)
    assert sub_ids(s2.get()) == [4]


def test_keep_alive_timeout_sends_disconnect_0x8d(server):
    c = raw.RawClient(server.mqtt_port)
    c.send(raw.packet(0x10, raw.mstr("MQTT") + bytes([5, 2]) + struct.pack("!H", 1) + b"\x00" + raw.mstr("ka")))
    assert c.recv_packet().name == "CONNACK"
    d = c.recv_packet(4)
    assert d.name == "DISCONNECT" and d.body[0] == 0x8D


# ---------------------------------------------------------------- 7. AUTH

def test_unsupported_authentication_method_gets_connack_0x8c(server):
    c = C5(server.mqtt_port, properties=props(PacketTypes.CONNECT, AuthenticationMethod="SCRAM-SHA-1"),
           expect_success=False)
    assert c.reason.value == 0x8C


def test_auth_without_a_method_is_a_protocol_error(server):
    c = raw.RawClient(server.mqtt_port)
    c.send(raw.packet(0x10, raw.mstr("MQTT") + bytes([5, 2]) + struct.pack("!H", 60) + b"\x00" + raw.mstr("au")))
    assert c.recv_packet().name == "CONNACK"
    c.send(raw.packet(0xF0, b"\x18\x00"))
    d = c.recv_packet()
    assert d.name == "DISCONNECT" and d.body[0] == 0x82


# ---------------------------------------------------------------- 8. acknowledgement reason codes

def test_puback_reason_codes(server):
    c = C5(server.mqtt_port)
    assert c.publish("nobody/listens", b"x", qos=1).value == 0x10
    assert c.publish("$SYS/x", b"x", qos=1).value == 0x87
    assert c.publish("devices/d1/x", b"x", qos=1).value == 0x87
    c.subscribe("someone/listens", 0)
    assert c.publish("someone/listens", b"x", qos=1).value == 0x00


def test_suback_and_unsuback_reason_codes(server):
    c = C5(server.mqtt_port)
    assert c.subscribe("devices/#", 1)[0].value == 0x87
    assert c.subscribe("deep/" * 200 + "x", 1)[0].value == 0x8F
    done = threading.Event()
    codes = []
    c.c.on_unsubscribe = lambda cl, u, mid, rcs, p: (codes.extend(rcs), done.set())
    c.c.unsubscribe("never/subscribed")
    assert done.wait(5)
    assert codes[0].value == 0x11


# ---------------------------------------------------------------- 9. mixed versions (mosquitto)

def test_mosquitto_v5_sees_properties_and_v311_sees_the_message(server):
    topic = unique("mosq5")
    sub = subprocess.Popen(["mosquitto_sub", "-V", "mqttv5", "-p", str(server.mqtt_port), "-h", "127.0.0.1",
                            "-t", topic, "-C", "1", "-W", "8", "-q", "1", "-F", "%t|%p|%P"],
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    old = subprocess.Popen(["mosquitto_sub", "-V", "mqttv311", "-p", str(server.mqtt_port), "-h", "127.0.0.1",
                            "-t", topic, "-C", "1", "-W", "8", "-q", "1"],
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    time.sleep(0.7)
    pub = subprocess.run(["mosquitto_pub", "-V", "mqttv5", "-p", str(server.mqtt_port), "-h", "127.0.0.1",
                          "-t", topic, "-m", "five", "-q", "1", "-D", "publish", "user-property", "k", "v"],
                         capture_output=True, text=True, timeout=10)
    assert pub.returncode == 0, pub.stderr
    out, err = sub.communicate(timeout=10)
    assert out.strip() == f"{topic}|five|k:v", err
    out, err = old.communicate(timeout=10)
    assert out.strip() == "five", err
