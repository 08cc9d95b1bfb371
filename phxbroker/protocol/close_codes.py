"""WebSocket close codes phxbroker sends, each defined once, with what phoenix.js does next.

phoenix.js 1.8.16 reconnects after any close it did not start; older 1.8 and 1.7 clients
stay away after 1000, which is why the server never ends a connection with it on purpose.
"""

NORMAL = 1000  # the answer to a client's own close frame, as Bandit gives it
GOING_AWAY = 1001  # kick, revoked credential, drain: clients reconnect and authenticate anew
PROTOCOL_ERROR = 1002  # also Bandit's idle-timeout code; phoenix.js reconnects
POLICY_VIOLATION = 1008  # a client over its rate or frame budget
MESSAGE_TOO_BIG = 1009
INTERNAL_ERROR = 1011  # a frame that is not a Phoenix message, as a crashed Phoenix socket
IDLE_TIMEOUT = PROTOCOL_ERROR

# Codes a peer may put on the wire (RFC 6455 section 7.4); others are never echoed.
SENDABLE = (
    frozenset(range(1000, 1004)) | frozenset(range(1007, 1015)) | frozenset(range(3000, 5000))
)
NO_STATUS = 1005  # what a Close frame without a code reads as (RFC 6455 section 7.1.5)


def answer_to_client_close(code: int) -> int:
    """The code Bandit (so Phoenix) answers a client's Close frame carrying `code` with:
    1000, whatever the client gave as its reason for leaving (no code, 1001, 4000, 5000
    ...), but 1002 for the codes RFC 6455 reserves for other uses (1004-1006, 1012-2999)."""
    if code == NO_STATUS or 1000 <= code <= 1003 or 1007 <= code <= 1011 or code >= 3000:
        return NORMAL
    return PROTOCOL_ERROR
