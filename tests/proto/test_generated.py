"""The committed generated code must be what `make proto` produces from proto/swarmlm.proto, and the wire
contract it describes carries only typed data: no pickle, no `Any`, no opaque bytes except tensor data."""
from pathlib import Path

from google.protobuf import any_pb2, descriptor_pb2, descriptor_pool
from google.protobuf.descriptor import FieldDescriptor, FileDescriptor

from proto import swarmlm_pb2 as pb
from proto.generate import GENERATED, ROOT, generate

RAW_BYTES = {("swarmlm.v1.Tensor", "data"),  # C-contiguous little-endian values of a declared dtype and shape
             ("swarmlm.v1.Tensor", "scales"),  # blockwise8: float32 scales, their count fixed by shape and block
             # chained steps: random session secrets (16..64 bytes), compared, never parsed
             ("swarmlm.v1.SessionOptions", "chain_token"), ("swarmlm.v1.ChainTarget", "token"),
             ("swarmlm.v1.ChainPush", "token")}


def test_generated_code_is_up_to_date(tmp_path: Path):
    generate(tmp_path)
    stale = [p for p in GENERATED if (tmp_path / p).read_bytes() != (ROOT / p).read_bytes()]
    assert not stale, f"generated code is stale, run `make proto`: {stale}"


def wire_problems(file: FileDescriptor, raw_bytes=frozenset()) -> list[str]:
    """Whatever in ``file`` could carry something other than our typed messages: an imported .proto
    (google.protobuf.Any, Struct, ...), a field of a message or enum defined elsewhere, a bytes field not in
    ``raw_bytes`` (full message name, field name), an RPC whose request or response is not ours."""
    problems = [f"imports {dep.name}" for dep in file.dependencies]

    def messages(containers):
        for m in containers:
            yield m
            yield from messages(m.nested_types)

    for message in messages(file.message_types_by_name.values()):
        for field in message.fields:
            where = f"{message.full_name}.{field.name}"
            if field.type == FieldDescriptor.TYPE_BYTES and (message.full_name, field.name) not in raw_bytes:
                problems.append(f"{where} is opaque bytes")
            elif field.type in (FieldDescriptor.TYPE_MESSAGE, FieldDescriptor.TYPE_GROUP) and \
                    field.message_type.file.name != file.name:
                problems.append(f"{where} is a {field.message_type.full_name}")
            elif field.type == FieldDescriptor.TYPE_ENUM and field.enum_type.file.name != file.name:
                problems.append(f"{where} is a {field.enum_type.full_name}")
    for service in file.services_by_name.values():
        for method in service.methods:
            problems += [f"{method.full_name} {what} is a {t.full_name}"
                         for what, t in (("request", method.input_type), ("response", method.output_type))
                         if t.file.name != file.name]
    return problems


def test_the_wire_contract_carries_only_typed_messages():
    assert pb.DESCRIPTOR.services_by_name["Node"].methods  # the walk below sees the real contract
    assert wire_problems(pb.DESCRIPTOR, RAW_BYTES) == []
    assert pb.Tensor.DESCRIPTOR.fields_by_name["dtype"].type == FieldDescriptor.TYPE_STRING  # data is typed
    # the source scan for pickle and torch.load is tests/test_no_unsafe_deserialization.py


def test_the_check_catches_any_and_opaque_bytes():
    pool = descriptor_pool.DescriptorPool()
    any_file = descriptor_pb2.FileDescriptorProto()
    any_pb2.DESCRIPTOR.CopyToProto(any_file)
    pool.Add(any_file)
    bad = descriptor_pb2.FileDescriptorProto(name="bad.proto", package="bad", syntax="proto3",
                                             dependency=["google/protobuf/any.proto"])
    request = bad.message_type.add(name="Request")
    optional = descriptor_pb2.FieldDescriptorProto.LABEL_OPTIONAL
    request.field.add(name="blob", number=1, type=descriptor_pb2.FieldDescriptorProto.TYPE_BYTES, label=optional)
    request.field.add(name="anything", number=2, type=descriptor_pb2.FieldDescriptorProto.TYPE_MESSAGE,
                      type_name=".google.protobuf.Any", label=optional)
    bad.service.add(name="Bad").method.add(name="Call", input_type=".bad.Request", output_type=".google.protobuf.Any")
    pool.Add(bad)
    assert wire_problems(pool.FindFileByName("bad.proto")) == [
        "imports google/protobuf/any.proto", "bad.Request.blob is opaque bytes",
        "bad.Request.anything is a google.protobuf.Any", "bad.Bad.Call response is a google.protobuf.Any"]
