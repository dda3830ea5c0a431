"""Waits until the nodes' `replicas` answers claim a master for all 4096 partitions between
them, and prints the time since START (a Unix time, seconds).

    python wait_ready.py START PORT,PORT,PORT
"""
import socket, struct, sys, time, base64
def info(port, cmd):
    s=socket.create_connection(("127.0.0.1",port),timeout=2)
    body=(cmd+"\n").encode(); s.sendall(struct.pack(">Q",(2<<56)|(1<<48)|len(body))+body)
    h=b""
    while len(h)<8: h+=s.recv(8-len(h))
    n=struct.unpack(">Q",h)[0]&0xFFFFFFFFFFFF; d=b""
    while len(d)<n: d+=s.recv(n-len(d))
    return d.decode()
t0=float(sys.argv[1]); ports=[int(p) for p in sys.argv[2].split(",")]
while True:
    bits=bytearray(512)
    for p in ports:
        try:
            r=info(p,"replicas").split("\t",1)[1].strip().split(":",1)[1].split(",")
            m=base64.b64decode(r[2])
            for i in range(512): bits[i]|=m[i]
        except Exception: pass
    if sum(bin(b).count("1") for b in bits)==4096:
        print("ready %.1f s after start"%(time.time()-t0)); break
    if time.time() - t0 > 300:
        sys.exit("not ready 300 s after start")
    time.sleep(0.2)
