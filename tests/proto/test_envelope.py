"""The envelope record survives a JSON round trip (it crosses the spool as JSON)."""

import json

from mailhaven.proto.envelope import Envelope, RecipientSpec


def test_json_round_trip() -> None:
    e = Envelope(
        "a@b.example",
        (
            RecipientSpec("c@d.example", ("SUCCESS", "FAILURE"), ("rfc822", "c@d.example")),
            RecipientSpec("x@y"),
        ),
        body_type="8BITMIME",
        smtputf8=True,
        dsn_ret="HDRS",
        dsn_envid="id1",
        auth_user="alice",
        extra={"k": "v"},
    )
    assert Envelope.from_dict(json.loads(json.dumps(e.to_dict()))) == e
