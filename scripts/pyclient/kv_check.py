"""Put through one Cell0 node and Get through every node, with a client
generated from proto/ by grpcio-tools: proves the .proto files are a usable
contract for other languages."""

import sys
import uuid

import grpc

from cell0.v1 import cluster_pb2, cluster_pb2_grpc, kv_pb2, kv_pb2_grpc


def main(endpoints):
    key = f"pyclient/{uuid.uuid4()}".encode()
    for i, writer in enumerate(endpoints):
        value = f"from python via {writer}".encode()
        with grpc.insecure_channel(writer) as ch:
            put = kv_pb2_grpc.KvStub(ch).Put(kv_pb2.PutRequest(key=key, value=value), timeout=30)
            print(f"put via {writer}: revision {put.header.revision}")
        for reader in endpoints:
            with grpc.insecure_channel(reader) as ch:
                got = kv_pb2_grpc.KvStub(ch).Get(kv_pb2.GetRequest(key=key), timeout=30)
                if got.kv.value != value:
                    sys.exit(f"get via {reader} returned {got.kv.value!r}, expected {value!r}")
                status = cluster_pb2_grpc.ClusterStub(ch).Status(cluster_pb2.StatusRequest(), timeout=30)
                print(f"get via {reader} ({status.node_name}): ok")
    with grpc.insecure_channel(endpoints[0]) as ch:
        try:
            kv_pb2_grpc.KvStub(ch).Put(kv_pb2.PutRequest(key=b"k" * 4097, value=b"v"), timeout=30)
            sys.exit("an oversize key was accepted")
        except grpc.RpcError as e:
            if e.code() != grpc.StatusCode.INVALID_ARGUMENT:
                sys.exit(f"oversize key gave {e.code()}, expected INVALID_ARGUMENT")
            print(f"oversize key: {e.code().name}: {e.details()}")
    print("python client: all checks passed")


if __name__ == "__main__":
    main(sys.argv[1:] or ["127.0.0.1:7100"])
