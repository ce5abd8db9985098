"""Put through one Cell0 node and Get (and Embed) through every node, with a client
generated from proto/ by grpcio-tools: proves the .proto files are a usable
contract for other languages. Then lists every node's services through
grpcio-reflection (reflection v1alpha)."""

import sys
import uuid

import grpc
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase

from cell0.v1 import cluster_pb2, cluster_pb2_grpc, inference_pb2, inference_pb2_grpc, kv_pb2, kv_pb2_grpc


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
    # Embed through every node, when a model is registered (the bootstrap
    # script registers one): every node gives the same unit vectors.
    texts = ["Cell0 runs agents", "nodes share models"]
    vectors = []
    for endpoint in endpoints:
        with grpc.insecure_channel(endpoint) as ch:
            try:
                r = inference_pb2_grpc.InferenceStub(ch).Embed(inference_pb2.EmbedRequest(texts=texts), timeout=30)
            except grpc.RpcError as e:
                if e.code() == grpc.StatusCode.FAILED_PRECONDITION:
                    print(f"embed via {endpoint}: skipped ({e.details()})")
                    continue
                raise
            vecs = [list(e.values) for e in r.embeddings]
            norms = [sum(v * v for v in vec) ** 0.5 for vec in vecs]
            if len(vecs) != 2 or r.dim != len(vecs[0]) or any(abs(n - 1) > 1e-4 for n in norms):
                sys.exit(f"embed via {endpoint}: unexpected answer (dim {r.dim}, norms {norms})")
            vectors.append(vecs)
            print(f"embed via {endpoint}: {r.model} v{r.version}, {r.dim} dimensions")
    for other in vectors[1:]:
        diff = max(abs(a - b) for va, vb in zip(vectors[0], other) for a, b in zip(va, vb))
        if diff > 1e-4:
            sys.exit(f"nodes disagree on embeddings by {diff}")
    # Server reflection through grpcio-reflection's client, which speaks
    # v1alpha only: every node lists the Cell0 services.
    for endpoint in endpoints:
        with grpc.insecure_channel(endpoint) as ch:
            services = set(ProtoReflectionDescriptorDatabase(ch).get_services())
            missing = {"cell0.v1.Kv", "cell0.v1.Cluster", "grpc.health.v1.Health"} - services
            if missing:
                sys.exit(f"reflection via {endpoint} lacks {sorted(missing)}: {sorted(services)}")
            print(f"reflection (v1alpha) via {endpoint}: {len(services)} services")
    print("python client: all checks passed")


if __name__ == "__main__":
    main(sys.argv[1:] or ["127.0.0.1:7100"])
