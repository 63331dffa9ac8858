"""Topic ACL rules from the config file (issue #4, broker policy): allow/deny publish and
subscribe by user and topic pattern with %u/%c substitution; a denied SUBSCRIBE gets 0x80 (v3)
or 0x87 (v5) in its SUBACK, a denied PUBLISH is dropped (v3) or answered with 0x87 (v5); both
are counted in /metrics."""

from __future__ import annotations

import re
import subprocess
import time
import urllib.request

from paho.mqtt.subscribeoptions import SubscribeOptions

from test_lifecycle import run_serve
from test_mqtt5 import C5

ACL = """
[mqtt.acl]
default = "deny"

[[mqtt.acl.rules]]
permission = "deny"
action = "all"
topic = "public/secret/#"

[[mqtt.acl.rules]]
permission = "allow"
action = "all"
topic = "public/#"

[[mqtt.acl.rules]]
permission = "allow"
action = "readwrite"
topic = "users/%u/#"

[[mqtt.acl.rules]]
permission = "allow"
action = "write"
topic = "clients/%c/status"

[[mqtt.acl.rules]]
user = "ops"
permission = "allow"
action = "read"
topic = "clients/#"
"""


def acl_server(start_server):
    return start_server("acl", config=ACL)


def denied(srv, action):
    body = urllib.request.urlopen(f"http://127.0.0.1:{srv.http_port}/metrics", timeout=5).read().decode()
    m = re.search(r'^stratus_mqtt_denied_total\{action="%s"\} (\d+)' % action, body, re.M)
    return int(m.group(1)) if m else 0


def test_v311_denied_subscribe_gets_0x80_and_allowed_one_is_granted(start_server, clients):
    srv = acl_server(start_server)
    c = clients.paho(srv.mqtt_port)
    assert c.subscribe([("public/news", 1), ("elsewhere/x", 1), ("public/#", 0),
                        ("public/secret/plans", 1)]) == [1, 0x80, 0x80, 0x80]
    assert denied(srv, "subscribe") == 3


def test_v5_denied_subscribe_gets_0x87(start_server):
    srv = acl_server(start_server)
    c = C5(srv.mqtt_port)
    codes = c.subscribe("elsewhere/#", options=SubscribeOptions(qos=1))
    assert [x.value for x in codes] == [0x87]
    codes = c.subscribe("public/open/+", options=SubscribeOptions(qos=1))
    assert [x.value for x in codes] == [1]
    c.disconnect()


def test_v311_denied_publish_is_acknowledged_dropped_and_counted(start_server, clients):
    srv = acl_server(start_server)
    ops = clients.paho(srv.mqtt_port, username="ops", password="x")
    ops.subscribe([("clients/#", 1)])
    watcher = clients.paho(srv.mqtt_port)
    watcher.subscribe("public/open", 1)
    before = denied(srv, "publish")
    pub = clients.paho(srv.mqtt_port, client_id="sensor-7")
    pub.publish("elsewhere/x", b"dropped", qos=1)          # PUBACK still arrives (3.1.1)
    pub.publish("public/secret/x", b"dropped", qos=1)
    pub.publish("clients/sensor-8/status", b"not mine", qos=1)  # %c is sensor-7
    pub.publish("clients/sensor-7/status", b"up", qos=1)
    pub.publish("public/open", b"fine", qos=1)
    assert watcher.get().payload == b"fine"
    assert [m.topic for m in ops.drain(within=0.5)] == ["clients/sensor-7/status"]
    assert denied(srv, "publish") - before == 3


def test_v5_denied_publish_gets_0x87(start_server):
    srv = acl_server(start_server)
    c = C5(srv.mqtt_port)
    assert c.publish("elsewhere/x", b"no", qos=1).value == 0x87
    assert c.publish("public/x", b"yes", qos=1).value in (0x00, 0x10)
    c.disconnect()


def test_user_substitution_confines_each_user_to_their_tree(start_server, clients):
    srv = acl_server(start_server)
    alice = clients.paho(srv.mqtt_port, username="alice", password="x")
    assert alice.subscribe([("users/alice/#", 1), ("users/bob/#", 1), ("users/+/inbox", 1)]) == [1, 0x80, 0x80]
    bob = clients.paho(srv.mqtt_port, username="bob", password="x")
    bob.publish("users/alice/inbox", b"from bob", qos=1)    # denied: not under users/bob/
    alice.publish("users/alice/notes", b"mine", qos=1)
    assert [m.payload for m in alice.drain(within=0.5)] == [b"mine"]
    anon = clients.paho(srv.mqtt_port)
    assert anon.subscribe("users/alice/#", 1) == [0x80], "%u rules do not apply without a user name"


def test_mosquitto_clients_see_the_same_rules(start_server):
    srv = acl_server(start_server)
    # A refused subscription: mosquitto_sub reports it (and gives up).
    res = subprocess.run(["mosquitto_sub", "-h", "127.0.0.1", "-p", str(srv.mqtt_port), "-V", "mqttv5",
                          "-t", "elsewhere/#", "-C", "1", "-W", "3"], capture_output=True, text=True, timeout=10)
    out = (res.stderr + res.stdout).lower()
    assert "all subscription requests were denied" in out, res
    # An allowed publish with mosquitto_pub reaches an allowed mosquitto_sub.
    sub = subprocess.Popen(["mosquitto_sub", "-h", "127.0.0.1", "-p", str(srv.mqtt_port), "-t", "public/m",
                            "-C", "1", "-W", "5"], stdout=subprocess.PIPE, text=True)
    time.sleep(0.5)
    subprocess.run(["mosquitto_pub", "-h", "127.0.0.1", "-p", str(srv.mqtt_port), "-t", "public/m",
                    "-m", "hello", "-q", "1"], check=True, timeout=10)
    assert sub.communicate(timeout=10)[0].strip() == "hello"


def test_will_to_a_denied_topic_is_refused(start_server, clients):
    srv = acl_server(start_server)
    c = clients.paho(srv.mqtt_port, connect=False, will=("elsewhere/will", b"x", 0, False))
    c.connect(expect_success=False)
    assert c.connect_rc is not None and c.connect_rc.value in (5, 0x87)  # not authorized (paho reports v3 code 5 as 0x87)


def test_invalid_acl_pattern_exits_2_naming_the_rule(tmp_path):
    res = run_serve(tmp_path, config='[[mqtt.acl.rules]]\npermission = "allow"\ntopic = "a/#/b"\n')
    assert res.returncode == 2, (res.returncode, res.stderr)
    assert "mqtt.acl.rules[0].topic" in res.stderr, res.stderr


def test_unknown_acl_action_exits_2(tmp_path):
    res = run_serve(tmp_path, config='[[mqtt.acl.rules]]\npermission = "allow"\naction = "fly"\ntopic = "a"\n')
    assert res.returncode == 2, (res.returncode, res.stderr)
    assert "action" in res.stderr, res.stderr


def test_without_rules_everything_outside_devices_is_open(server, clients):
    c = clients.paho(server.mqtt_port)
    assert c.subscribe([("anything/#", 1)]) == [1]
