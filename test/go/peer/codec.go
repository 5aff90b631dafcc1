// Package peer holds what the grpc-go test agent and client share: the message codec, the
// deterministic test content, JSON event lines, and dialing kasd the way agentk does.
package peer

import (
	"fmt"

	"google.golang.org/grpc/encoding"
	"google.golang.org/protobuf/proto"
)

// Raw is a message passed through as its bytes (routed calls: any method, any payload).
type Raw []byte

// codec replaces grpc-go's "proto" codec. Debian's grpc-go 1.33 pairs with the APIv1 protobuf
// runtime (golang/protobuf 1.3), while protoc-gen-go 1.28 generates APIv2 messages; this codec
// marshals those with protobuf-go directly, and *Raw as-is.
type codec struct{}

func (codec) Name() string { return "proto" }

func (codec) Marshal(v interface{}) ([]byte, error) {
	switch m := v.(type) {
	case *Raw:
		return []byte(*m), nil
	case Raw:
		return []byte(m), nil
	case proto.Message:
		return proto.Marshal(m)
	}
	return nil, fmt.Errorf("codec: cannot marshal %T", v)
}

func (codec) Unmarshal(data []byte, v interface{}) error {
	switch m := v.(type) {
	case *Raw:
		*m = append(Raw(nil), data...)
		return nil
	case proto.Message:
		return proto.Unmarshal(data, m)
	}
	return fmt.Errorf("codec: cannot unmarshal into %T", v)
}

func init() {
	encoding.RegisterCodec(codec{})
}
