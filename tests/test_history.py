"""History and recovery: positions, the last N messages of a topic, and a
client that comes back with ``?since=P`` getting exactly what it missed.

The history and the seam are tested without sockets first (every way a
subscribe can race a publish); then through the real command, in one
process and in two processes through a real redis-server (a restart with
and without persistence, a partition between one server and Redis through
the proxy the Redis tests use, a position jump on the live path).

"Nothing else arrived" is shown with a marker sent after it on the same
ordered path, never by waiting for silence.
"""

import json
import subprocess
import sys
import threading
import urllib.parse
from contextlib import ExitStack, contextmanager

import pytest

import wsloop
from helpers import Client, running_server
from redis_fixture import bulk, push, wait_until
from test_cli import CliServer

FAST_FAILURE = dict(ping_interval=0.3, ping_timeout=0.5, reconnect_max=0.5)
RECOVERY_TIMEOUT = 15.0


# -- 1. positions and the history, without sockets ------------------------------------


def test_positions_are_epoch_and_offset_and_anything_else_is_not_one():
    assert wsloop._parse_position(wsloop._format_position("ab12", 7)) == ("ab12", 7)
    for bad in [None, 7, "", "7", "-7", "ab-", "ab--1", "a b-1", "ab-1.5", "ab-+1", "\u00e9-1", "ab-\u0661",
                "x" * 200 + "-1", "ab-" + "9" * 30, "a:b-1"]:
        assert wsloop._parse_position(bad) is None, bad


def test_history_keeps_the_last_n_with_contiguous_offsets():
    history = wsloop._History(3)
    positions = [history.append("t", "m%d" % n)[:2] for n in range(5)]
    epoch = positions[0][0]
    assert positions == [(epoch, n) for n in range(1, 6)]
    page = history.read("t", 1)
    assert (page.epoch, page.top, page.first, page.messages) == (epoch, 5, 3, ["m2", "m3", "m4"])
    page = history.read("t", 4)
    assert (page.first, page.messages) == (5, ["m4"])
    assert history.read("t", 5).messages == []
    assert history.read("other", 0).epoch == ""


def test_history_forgets_messages_older_than_its_ttl():
    now = [100.0]
    history = wsloop._History(10, ttl=5.0, clock=lambda: now[0])
    history.append("t", "old")
    now[0] += 4.0
    history.append("t", "young")
    now[0] += 1.5
    page = history.read("t", 0)
    assert (page.first, page.messages) == (2, ["young"])


def test_history_keeps_at_most_history_topics_topics():
    history = wsloop._History(2, max_topics=3)
    for topic in ["a", "b", "c", "a", "d"]:  # "a" published again: "b" is the oldest
        history.append(topic, topic)
    assert len(history) == 3
    assert history.read("b", 0).epoch == ""
    assert history.read("a", 0).messages == ["a", "a"]


def deliver_all(catchup, history, held_before, held_after):
    """Drive a catch-up: live messages ``held_before`` arrive before the
    first page, ``held_after`` after it (before the next page, or once it
    is over: the live stream may lag behind the read); pages of 2 from
    ``history`` (offset -> message, epoch "e")."""
    out = []
    for offset in held_before:
        out.extend(catchup.live(offset, offset))
    top = max(history) if history else 0
    more = True
    while more:
        after = catchup.cursor
        page = [offset for offset in sorted(history) if offset > after][:2]
        first = page[0] if page else max(after + 1, min(history) if history else 1)
        items, more = catchup.page("e", top, first, page)
        out.extend(items)
        for offset in held_after:
            out.extend(catchup.live(offset, offset))
        held_after = []
    return out


@pytest.mark.parametrize("seen", [0, 3, 7])
def test_a_subscribe_racing_publishes_neither_drops_nor_repeats(seen):
    """The subscription is made, then history is read: messages 1..top are
    in history, and the live stream starts anywhere from 1 to top + 1 (what
    was published between subscribing and reading arrives both ways).
    Every split gives seen+1 .. the last live one, each once, in order."""
    top, last_live = 8, 11
    history = {offset: offset for offset in range(1, top + 1)}
    for live_from in range(1, top + 2):
        live = list(range(live_from, last_live + 1))
        for split in range(len(live) + 1):
            catchup = wsloop._Catchup("e", seen)
            out = deliver_all(catchup, history, live[:split], live[split:])
            assert catchup.recovered is True
            assert out == list(range(seen + 1, last_live + 1)), (live_from, split, out)


def test_a_live_message_beyond_the_read_makes_it_read_again():
    """A message published after history was read but before the live
    stream held anything (e.g. a merged read made for someone else):
    the gap between is read, not skipped."""
    catchup = wsloop._Catchup("e", 2)
    catchup.hold(7, 7)
    items, more = catchup.page("e", 4, 3, [3, 4])
    assert (items, more) == ([3, 4], True)
    items, more = catchup.page("e", 7, 5, [5, 6, 7])
    assert (items, more) == ([5, 6, 7], False)


def test_recovery_is_all_or_nothing_for_a_subscriber():
    too_old = wsloop._Catchup("e", 1)
    too_old.hold(9, 9)
    assert too_old.page("e", 8, 4, [4, 5, 6, 7, 8]) == ([9], False)
    assert too_old.recovered is False
    other_epoch = wsloop._Catchup("old", 3)
    assert other_epoch.page("e", 8, 1, list(range(1, 9))) == ([], False)
    assert other_epoch.recovered is False
    beyond = wsloop._Catchup("e", 20)
    assert beyond.page("e", 8, 9, [])[0] == [] and beyond.recovered is False
    no_history = wsloop._Catchup("e", 3)
    assert no_history.page("", 0, 1, []) == ([], False) and no_history.recovered is False


def test_a_repair_delivers_what_history_still_has_and_counts_the_rest():
    repair = wsloop._Catchup("e", 1, whole=False)
    repair.hold(9, 9)
    items, more = repair.page("e", 8, 4, [4, 5, 6, 7, 8])
    assert (items, more, repair.missed) == ([4, 5, 6, 7, 8, 9], False, 2)


# -- 2. the command, one process ----------------------------------------------------------


@pytest.fixture
def cli():
    servers = []

    def start(*args):
        servers.append(CliServer(*args))
        return servers[-1]

    yield start
    for server in servers:
        server.stop()


@pytest.fixture
def clients():
    opened = []

    def open_client(port, path="/", **kw):
        kw.setdefault("timeout", 10.0)
        opened.append(Client(port, path=path, **kw))
        return opened[-1]

    yield open_client
    for client in opened:
        client.shutdown()


def since(position):
    return "/?since=" + urllib.parse.quote(position, safe="")


def chat(client, count):
    return [json.loads(client.recv_message()) for _ in range(count)]


def send_and_read(sender, texts):
    for text in texts:
        sender.send_text(text)
    got = chat(sender, len(texts))
    assert [one["message"] for one in got] == texts
    return got


def offsets(messages):
    return [wsloop._parse_position(one["position"])[1] for one in messages]


def test_cli_history_one_process(cli, clients):
    server = cli("--broadcast", "--history", "5")
    a = clients(server.port)
    got = send_and_read(a, ["m%d" % n for n in range(8)])
    assert offsets(got) == list(range(1, 9))
    assert len({wsloop._parse_position(one["position"])[0] for one in got}) == 1
    # Back from the 5th: the 6th to the 8th, then the live stream.
    b = clients(server.port, since(got[4]["position"]))
    assert json.loads(b.recv_message()) == {"recovered": True}
    assert chat(b, 3) == got[5:]
    live = send_and_read(a, ["live"])
    assert chat(b, 1) == live
    # Back from the newest: recovered, nothing repeated, then live.
    c = clients(server.port, since(live[0]["position"]))
    assert json.loads(c.recv_message()) == {"recovered": True}
    sent = send_and_read(a, ["next"])
    assert chat(c, 1) == sent


@pytest.mark.parametrize("position", ["too old", "other-3", "not a position", "%ff%00", "x" * 300])
def test_cli_a_position_that_cannot_be_recovered_says_so_then_goes_live(cli, clients, position):
    server = cli("--broadcast", "--history", "3")
    a = clients(server.port)
    got = send_and_read(a, ["m%d" % n for n in range(6)])
    if position == "too old":
        position = got[0]["position"]  # 5 messages on, 3 kept
    b = clients(server.port, "/?since=" + urllib.parse.quote(position, safe="%"))
    assert json.loads(b.recv_message()) == {"recovered": False}
    sent = send_and_read(a, ["live"])
    assert chat(b, 1) == sent


def test_cli_without_history_nothing_changes(cli, clients):
    server = cli("--broadcast")
    a = clients(server.port, "/?since=abc-1")
    a.send_text("plain")
    assert a.recv_message() == "plain"


@pytest.mark.parametrize("args, message", [
    (["--history", "5"], "--history goes with --broadcast or --app"),
    (["--broadcast", "--history-ttl", "5"], "--history-ttl goes with --history"),
    (["--broadcast", "--history", "0"], "--history"),
])
def test_cli_history_user_errors_are_one_line(args, message):
    result = subprocess.run([sys.executable, "-m", "wsloop"] + args, capture_output=True, text=True, timeout=30)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], result.stderr


def test_since_needs_a_server_with_history():
    with running_server(wsloop.Echo()) as server:
        with pytest.raises(ValueError):
            server.subscribe(None, "t", since="e-1")


# -- 3. two processes through Redis -----------------------------------------------------------


def redis_chat(cli, redis_server, *extra):
    return cli("--broadcast", "--history", "50", "--redis", redis_server.url, *extra)


def test_cli_two_processes_recover_on_the_other_process(cli, clients, redis_server):
    A, B = redis_chat(cli, redis_server), redis_chat(cli, redis_server)
    a = clients(A.port)
    got = send_and_read(a, ["m%d" % n for n in range(10)])
    assert offsets(got) == list(range(1, 11))
    b = clients(B.port, since(got[3]["position"]))
    assert json.loads(b.recv_message()) == {"recovered": True}
    assert chat(b, 6) == got[4:]
    sent = send_and_read(a, ["live"])
    assert chat(b, 1) == sent


def test_cli_redis_restart_without_persistence_is_not_recovered(cli, clients, redis_server):
    A = redis_chat(cli, redis_server)
    a = clients(A.port)
    got = send_and_read(a, ["m%d" % n for n in range(5)])
    redis_server.restart()  # empty: no data kept
    after = send_and_read(a, ["after"])  # comes back once A has reconnected
    assert wsloop._parse_position(after[0]["position"])[0] != wsloop._parse_position(got[0]["position"])[0]
    b = clients(A.port, since(got[2]["position"]))
    assert json.loads(b.recv_message()) == {"recovered": False}
    sent = send_and_read(a, ["live"])
    assert chat(b, 1) == sent


def test_cli_redis_restart_with_persistence_is_recovered(cli, clients, start_redis):
    redis_server = start_redis(["--appendonly", "yes", "--appendfsync", "always"])
    A = redis_chat(cli, redis_server)
    a = clients(A.port)
    got = send_and_read(a, ["m%d" % n for n in range(5)])
    redis_server.restart()
    after = send_and_read(a, ["after"])
    assert offsets(after) == [6]
    b = clients(A.port, since(got[2]["position"]))
    assert json.loads(b.recv_message()) == {"recovered": True}
    assert chat(b, 3) == got[3:] + after


# -- 4. repair on the live path ----------------------------------------------------------------


class HistoryChat(wsloop.Chat):
    def __init__(self):
        self.gaps = []

    def on_broker_gap(self, server, topics, missed=None):
        self.gaps.append((list(topics), missed))


@contextmanager
def history_cluster(urls, history_ttl=None, **broker_options):
    with ExitStack() as stack:
        nodes = []
        for url in urls:
            handler = HistoryChat()
            broker = wsloop.RedisBroker(url, **broker_options)
            server = stack.enter_context(running_server(
                handler, broker=broker, history=100, history_ttl=history_ttl, position_format=wsloop.Chat.format,
                ping_interval=None, compression=False,
            ))
            nodes.append(server)
        for server in nodes:
            wait_until(lambda: server.broker.state == "connected", RECOVERY_TIMEOUT, message="never connected")
        yield nodes


def test_a_partition_between_a_receiver_and_redis_loses_nothing(redis_server, partition_proxy, clients):
    """Before: Redis pub/sub replays nothing, so what was published while
    B was cut off never reached B's clients.  Now B reads it from history
    once it is back, in order, each message once."""
    proxy = partition_proxy(redis_server.port)
    with history_cluster([redis_server.url, proxy.url], **FAST_FAILURE) as (A, B):
        a, b = clients(A.port), clients(B.port)
        redis_server.wait_numsub("wsloop:chat", 2)
        first = send_and_read(a, ["before"])
        assert chat(b, 1) == first
        proxy.partition()
        during = send_and_read(a, ["during-%d" % n for n in range(20)])
        wait_until(lambda: B.broker.state != "connected", RECOVERY_TIMEOUT, message="B never noticed")
        proxy.heal()
        wait_until(lambda: B.broker.state == "connected", RECOVERY_TIMEOUT, message="B never came back")
        end = send_and_read(a, ["end"])
        assert chat(b, 21) == during + end
        stats = B.broker.stats()
        assert stats["repairs"] >= 1 and stats["missed"] == 0, stats
        assert B.handler.gaps == []


def test_a_position_jump_is_filled_from_history_before_the_later_message(redis_server, clients):
    """A message that reached history but not the subscription (written
    here straight into Redis, as a lost PUBLISH would leave it): the
    receiver sees offset 3 after 1, reads 2 from history, and delivers
    2 then 3."""
    with history_cluster([redis_server.url]) as (A,):
        a = clients(A.port)
        redis_server.wait_numsub("wsloop:chat", 1)
        first = send_and_read(a, ["one"])
        envelope = b"\x00" * 8 + b"\x00" * 8 + b"t" + b"two"
        admin = redis_server.admin
        admin.hincrby("wsloop:p:chat", "top", 1)
        admin.rpush("wsloop:h:chat", envelope)
        a.send_text("three")
        got = chat(a, 2)
        assert [one["message"] for one in got] == ["two", "three"]
        assert offsets(first + got) == [1, 2, 3]
        assert A.broker.stats()["repairs"] == 1
        assert A.handler.gaps == []


# -- 5. a Redis that answers history badly -------------------------------------------------------

BAD_READS = {
    "not an array": b"+OK\r\n",
    "too short": push(b"e", 1),
    "an epoch that is not a word": push(b"e e", 1, 1),
    "a negative top": push(b"e", -1, 1),
    "a message that is an integer": push(b"e", 2, 1, 5),
    "more messages than a page": b"*60\r\n" + bulk(b"e") + b":60\r\n:1\r\n" + bulk(b"\0" * 17 + b"x") * 57,
}


@pytest.mark.parametrize("reply", list(BAD_READS.values()), ids=list(BAD_READS))
def test_a_bad_answer_to_a_history_read_drops_only_that_link(fake_redis, clients, reply):
    """Each is a protocol error on the publishing link (never a crash): the
    link is made again, the read asked again, and the client told once."""
    fake_redis.eval_replies = [reply, push(b"", 0, 1)]
    with history_cluster([fake_redis.url], **FAST_FAILURE) as (A,):
        b = clients(A.port, since("e-1"))
        assert json.loads(b.recv_message()) == {"recovered": False}
        assert A.broker.stats()["protocol_errors"] == 1
        a = clients(A.port)
        a.send_text("still serving")
        fake_redis.wait(lambda: sum(1 for _, args in fake_redis.log if args[0] == b"EVALSHA") >= 3)


@pytest.mark.parametrize("data", [b"#", b"#e", b"#e:1", b"#e e:1:x", b"#e:x:" + b"\0" * 17 + b"t"])
def test_a_history_message_without_a_position_is_a_protocol_error(fake_redis, clients, data):
    with history_cluster([fake_redis.url], **FAST_FAILURE) as (A,):
        clients(A.port)
        number, sock = fake_redis.subscriber()
        fake_redis.send(sock, push(b"message", b"wsloop:chat", data))
        wait_until(lambda: A.broker.stats()["protocol_errors"] == 1, 10, message="no protocol error")
        fake_redis.subscriber(after=number + 1)


def test_once_caught_up_the_live_stream_may_lag_but_never_repeats():
    catchup = wsloop._Catchup("e", 2)
    assert catchup.page("e", 5, 3, [3, 4, 5]) == ([3, 4, 5], False)
    assert [catchup.live(offset, offset, "e") for offset in (4, 5, 6, 7)] == [[], [], [6], [7]]
    # A new epoch (Redis lost its data): its offsets start again and pass.
    assert catchup.live(1, "new", "f") == ["new"]


def test_with_history_a_publish_waits_until_the_subscription_is_confirmed(fake_redis, clients):
    """This process hears its own messages only through its subscription:
    a publish sent before Redis confirmed it would never come back (the
    first messages after a start were lost this way)."""
    fake_redis.hold_confirmations = True
    with history_cluster([fake_redis.url], **FAST_FAILURE) as (A,):
        clients(A.port)
        fake_redis.wait(lambda: any(args[0] == b"SUBSCRIBE" for _, args in fake_redis.log))
        A.publish("chat", "early")
        ran = threading.Event()
        A.call_soon_threadsafe(ran.set)  # after the publish: the door is in order
        assert ran.wait(5)
        assert not [args for _, args in fake_redis.log if args[0] == b"EVALSHA"]
        fake_redis.release_confirmations()
        fake_redis.wait(lambda: any(args[0] == b"EVALSHA" for _, args in fake_redis.log))


def test_a_long_recovery_through_redis_is_read_in_bounded_pages(redis_server, clients):
    """Redis history is read at most 48 messages and 32 KiB (past the
    first) a page, each reply within the bridge's bounds; a recovery
    longer than a page reads on from where the last one ended."""
    with history_cluster([redis_server.url]) as (A,):
        a = clients(A.port)
        redis_server.wait_numsub("wsloop:chat", 1)
        texts = ["small %d" % n for n in range(60)] + ["large %d " % n + "x" * 30000 for n in range(4)]
        got = send_and_read(a, texts)
        epoch = wsloop._parse_position(got[0]["position"])[0]
        reads = A.broker.stats()["history_reads"]
        b = clients(A.port, since("%s-0" % epoch))
        assert json.loads(b.recv_message()) == {"recovered": True}
        assert chat(b, len(texts)) == got
        # 48 + 12 small and the first large + one large a page: 5 pages.
        assert A.broker.stats()["history_reads"] - reads == 5


def test_a_partition_between_the_publisher_and_redis_loses_nothing(redis_server, partition_proxy, clients):
    """Before: what A published into its dead link was lost for everyone
    (the link is reset, not flushed).  Now the appends Redis did not answer
    are sent again once A is back, marked so that Redis skips any it did
    run: every subscriber, A's own too, gets each message once, in order."""
    proxy = partition_proxy(redis_server.port)
    with history_cluster([proxy.url, redis_server.url], **FAST_FAILURE) as (A, B):
        a, b = clients(A.port), clients(B.port)
        redis_server.wait_numsub("wsloop:chat", 2)
        first = send_and_read(a, ["before"])
        assert chat(b, 1) == first
        proxy.partition()
        during = ["during-%d" % n for n in range(20)]
        for text in during:
            a.send_text(text)
        wait_until(lambda: A.broker.state != "connected", RECOVERY_TIMEOUT, message="A never noticed")
        proxy.heal()
        got_a = chat(a, 20)
        got_b = chat(b, 20)
        assert [one["message"] for one in got_a] == during
        assert got_b == got_a
        assert offsets(first + got_a) == list(range(1, 22))
        end = send_and_read(a, ["end"])
        assert chat(b, 1) == end
        assert proxy.release() == 0, "the dead link's bytes reached Redis after the partition"


def test_an_append_sent_again_is_not_doubled(redis_server):
    """The retry flag: an append Redis already ran is skipped."""
    admin = redis_server.admin
    sha = admin.script_load(wsloop._APPEND_SCRIPT)
    envelope = b"N" * 8 + b"\0" * 7 + b"\1" + b"t" + b"once"
    keys = ["wsloop:h:t", "wsloop:p:t"]
    assert admin.evalsha(sha, 2, *keys, "wsloop:t", envelope, "10", "epoch1", "0", "0") == 1
    assert admin.evalsha(sha, 2, *keys, "wsloop:t", envelope, "10", "epoch1", "0", "1") == 0
    assert admin.lrange("wsloop:h:t", 0, -1) == [envelope]
    other = b"N" * 8 + b"\0" * 7 + b"\2" + b"t" + b"next"
    assert admin.evalsha(sha, 2, *keys, "wsloop:t", other, "10", "epoch1", "0", "1") == 2


def test_with_history_a_message_redis_cannot_carry_is_refused_not_lost(redis_server):
    """With history every message is delivered once Redis gives it a
    position; one over the broker's max_message never would be, so publish
    refuses it in the caller's thread rather than drop it silently."""
    broker = wsloop.RedisBroker(redis_server.url, max_message=1000)
    with running_server(broker=broker, history=10) as server:
        with pytest.raises(ValueError, match="max_message"):
            server.publish("t", "\u00e9" * 501)  # 1,002 bytes of UTF-8
        with pytest.raises(ValueError, match="max_message"):
            server.publish("t", bytes(1001))
        assert server.publish("t", bytes(1000)) == 0  # taken: delivered when Redis sends it back
    assert broker.stats()["dropped"] == 0


@pytest.mark.parametrize("options", [dict(history=0), dict(history=5, history_ttl=0), dict(history=5, history_topics=0),
                                     dict(history_ttl=5), dict(position_format=str)])
def test_history_options_are_checked(options):
    with pytest.raises(ValueError):
        wsloop.Server(port=0, **options)


def test_history_ttl_in_redis_expires_a_topics_list_and_recovery_says_so(redis_server, clients):
    """--history-ttl in Redis: the list expires that long after the last
    message (its expiry is brought forward here rather than waited out);
    a client coming back then is told it cannot recover."""
    with history_cluster([redis_server.url], history_ttl=30) as (A,):
        a = clients(A.port)
        redis_server.wait_numsub("wsloop:chat", 1)
        got = send_and_read(a, ["m1", "m2", "m3"])
        admin = redis_server.admin
        assert 0 < admin.pttl("wsloop:h:chat") <= 30000
        admin.pexpire("wsloop:h:chat", 1)
        wait_until(lambda: not admin.exists("wsloop:h:chat"), 5, message="never expired")
        b = clients(A.port, since(got[0]["position"]))
        assert json.loads(b.recv_message()) == {"recovered": False}
        sent = send_and_read(a, ["live"])
        assert chat(b, 1) == sent
        assert offsets(sent) == [4], "the offsets go on: the epoch is kept"
