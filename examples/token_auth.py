import hmac
import os

import wsloop

TOKEN = os.environ.get("WS_TOKEN", "change-me").encode()

class TokenAuth(wsloop.Handler):
    def on_handshake(self, conn):
        supplied = conn.query.partition("token=")[2].encode()
        if not hmac.compare_digest(supplied, TOKEN):  # constant time: no timing leak
            return wsloop.Response(401, "token required\n", [("WWW-Authenticate", "Bearer")])
        return wsloop.Response(101, headers=[("Set-Cookie", "session=ok; HttpOnly; Secure")])

    def on_message(self, conn, message):
        conn.send(message)

if __name__ == "__main__":
    wsloop.serve(TokenAuth(), port=8765, origins=["https://app.example.com"])
