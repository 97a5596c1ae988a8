import sys

import wsloop

url = sys.argv[1] if len(sys.argv) > 1 else "ws://127.0.0.1:8765/chat?room=1"
with wsloop.connect(url, subprotocols=["chat.v1"]) as ws:
    ws.send("hello")
    print(ws.recv(timeout=5))       # str for text, bytes for binary
    for message in ws:              # until the server closes normally
        print(message)
