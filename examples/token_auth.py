import hmac
import os
import sys

import wsloop

TOKEN = os.environ.get("WS_TOKEN", "").encode()
if not TOKEN:  # no default: a token written in this file is no secret
    print("token_auth: set WS_TOKEN to the token clients must send", file=sys.stderr)
    sys.exit(2)

class TokenAuth(wsloop.Handler):
    def on_handshake(self, conn):
        tokens = conn.query_params.get("token", [])  # ?token=... percent-decoded, every value
        # Exactly one token, compared in constant time: response times leak nothing.
        if len(tokens) != 1 or not hmac.compare_digest(tokens[0].encode(), TOKEN):
            return wsloop.Response(401, "token required\n", [("WWW-Authenticate", "Bearer")])
        return wsloop.Response(101, headers=[("Set-Cookie", "session=ok; HttpOnly; Secure")])

    def on_message(self, conn, message):
        conn.send(message)

if __name__ == "__main__":
    wsloop.serve(TokenAuth(), port=8765, origins=["https://app.example.com"])
