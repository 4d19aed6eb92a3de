"""Generated gRPC/protobuf code for proto/garrison/v1 (see ops/scripts/gen_proto.py). Do not edit."""
