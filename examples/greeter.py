import logging
import wsloop

class Greeter(wsloop.Handler):
    def on_connect(self, conn):
        conn.send("hello, " + (conn.query or "stranger"))

    def on_message(self, conn, message):
        conn.send(message.upper() if isinstance(message, str) else message)

    def on_close(self, conn, code, reason):
        print("connection", conn.id, "closed with", code, flush=True)

if __name__ == "__main__":  # run it: python greeter.py (or wsloop --app greeter:Greeter)
    logging.basicConfig(level=logging.INFO)  # wsloop logs connections and errors
    wsloop.serve(Greeter(), port=8765)
