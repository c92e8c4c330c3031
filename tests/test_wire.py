"""The wire contract: pykine's own .proto declarations against an independent client's.

aetcd ships Python code generated from etcd's declarations. Every message,
field number and type, enum value and method path pykine declares must be
identical to it. Descriptors are compared as FileDescriptorProtos, so pykine's
generated modules are never loaded into this process's protobuf pool.
"""

from __future__ import annotations

import filecmp
import os
import subprocess
import sys
import tempfile
from typing import Any

import aetcd.rpc.auth_pb2
import aetcd.rpc.kv_pb2
import aetcd.rpc.rpc_pb2
from google.protobuf import descriptor_pb2
from harness import ROOT

PROTOS = ["pykine/wire/kv.proto", "pykine/wire/auth.proto", "pykine/wire/rpc.proto"]
# Declared by etcd but deliberately not by pykine: lease checkpoints are raft-internal.
NOT_DECLARED_PREFIXES = ("etcdserverpb.LeaseCheckpoint",)


HEALTH_PROTO = "pykine/wire/health.proto"


def _protoc(*args: str, protos: tuple[str, ...] = tuple(PROTOS)) -> None:
    subprocess.run([sys.executable, "-m", "grpc_tools.protoc", "-I", ".", *args, *protos], cwd=ROOT, check=True)


def _ours(protos: tuple[str, ...] = tuple(PROTOS)) -> list[descriptor_pb2.FileDescriptorProto]:
    with tempfile.TemporaryDirectory() as scratch:
        out = os.path.join(scratch, "set.pb")
        _protoc(f"--descriptor_set_out={out}", protos=protos)
        files = descriptor_pb2.FileDescriptorSet()
        with open(out, "rb") as data:
            files.ParseFromString(data.read())
    return list(files.file)


def _theirs(module: Any) -> descriptor_pb2.FileDescriptorProto:
    proto = descriptor_pb2.FileDescriptorProto()
    module.DESCRIPTOR.CopyToProto(proto)
    return proto


def _shapes(proto: descriptor_pb2.FileDescriptorProto) -> dict[str, Any]:
    """Everything that reaches the wire, by fully qualified name."""
    shapes: dict[str, Any] = {}

    def message(node: Any, scope: str) -> None:
        name = f"{scope}.{node.name}"
        shapes[name] = sorted(
            (
                f.name,
                f.number,
                f.type,
                f.label,
                f.type_name.rsplit(".", 1)[-1],
                f.oneof_index if f.HasField("oneof_index") else -1,
            )
            for f in node.field
        )
        for child in node.nested_type:
            message(child, name)
        for enum in node.enum_type:
            shapes[f"{name}.{enum.name}"] = sorted((v.name, v.number) for v in enum.value)

    for node in proto.message_type:
        message(node, proto.package)
    for enum in proto.enum_type:
        shapes[f"{proto.package}.{enum.name}"] = sorted((v.name, v.number) for v in enum.value)
    for service in proto.service:
        shapes[f"/{proto.package}.{service.name}"] = sorted(
            (
                m.name,
                m.input_type.rsplit(".", 1)[-1],
                m.output_type.rsplit(".", 1)[-1],
                m.client_streaming,
                m.server_streaming,
            )
            for m in service.method
        )
    return shapes


def test_declarations_match_etcds() -> None:
    ours: dict[str, Any] = {}
    for proto in _ours():
        ours.update(_shapes(proto))
    theirs = {
        **_shapes(_theirs(aetcd.rpc.kv_pb2)),
        **_shapes(_theirs(aetcd.rpc.auth_pb2)),
        **_shapes(_theirs(aetcd.rpc.rpc_pb2)),
    }
    assert "/etcdserverpb.KV" in ours and "mvccpb.KeyValue" in ours and "/etcdserverpb.Auth" in ours
    for name, shape in ours.items():
        assert name in theirs, f"pykine declares {name}, etcd does not"
        assert shape == theirs[name], f"{name} differs:\n pykine {shape}\n etcd   {theirs[name]}"
    missing = {name for name in theirs if name not in ours}
    assert all(name.startswith(NOT_DECLARED_PREFIXES) for name in missing), missing


def test_health_declaration_matches_grpcs() -> None:
    """pykine declares grpc.health.v1 itself; it must be the one grpcio's health package carries."""
    from grpc_health.v1 import health_pb2

    [ours] = _ours((HEALTH_PROTO,))
    theirs = _shapes(_theirs(health_pb2))
    for name, shape in _shapes(ours).items():
        if name.startswith("/"):  # a service: grpcio's newer one adds List, which etcd's grpc-go lacks
            assert set(shape) <= set(theirs[name])
        else:
            assert shape == theirs[name], name


def in_pykine_pool(code: str) -> str:
    """What `make proto` does to protoc's modules: load them into pykine/wire/pool.py's pool."""
    default_pool = "from google.protobuf import descriptor_pool as _descriptor_pool\n"
    code = code.replace(default_pool, "from pykine.wire.pool import POOL as _POOL\n")
    return code.replace("_descriptor_pool.Default()", "_POOL")


def test_generated_code_is_up_to_date() -> None:
    """The committed *_pb2 modules are exactly what `make proto` produces."""
    with tempfile.TemporaryDirectory() as scratch:
        _protoc(f"--python_out={scratch}", f"--pyi_out={scratch}", protos=(*PROTOS, HEALTH_PROTO))
        generated = os.path.join(scratch, "pykine", "wire")
        names = sorted(name for name in os.listdir(generated) if name.endswith((".py", ".pyi")))
        assert names, "protoc generated nothing"
        for name in names:
            path = os.path.join(generated, name)
            with open(path) as file:
                code = file.read()
            with open(path, "w") as file:
                file.write(in_pykine_pool(code))
        _, mismatch, errors = filecmp.cmpfiles(generated, os.path.join(ROOT, "pykine", "wire"), names, shallow=False)
        assert not mismatch and not errors, f"run `make proto`: stale {mismatch}, missing {errors}"
