"""Two tiny UDP programs for tests that check a path through namespaces: ``ECHO ADDR``
answers one datagram with "<it> from <sender's address>", ``ASK ADDR`` sends "hi" until
it hears the answer (bounded: 30 tries of 0.5 s) and prints it."""

ECHO = """
import socket, sys
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.bind((sys.argv[1], 9999))
s.settimeout(20)
data, addr = s.recvfrom(100)
s.sendto(data + b" from " + addr[0].encode(), addr)
"""

ASK = """
import socket, sys
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.settimeout(0.5)
for _ in range(30):
    s.sendto(b"hi", (sys.argv[1], 9999))
    try:
        print(s.recvfrom(100)[0].decode()); break
    except TimeoutError:
        continue
"""
