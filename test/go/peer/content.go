package peer

import (
	"encoding/binary"
	"fmt"
)

// Content is a deterministic pseudo-random byte stream: byte i depends only on (seed, i), so
// both ends can produce or check it in any chunking.
type Content struct {
	seed uint64
	off  int64
}

func NewContent(seed uint64) *Content { return &Content{seed: seed} }

func mix(x uint64) uint64 { // splitmix64 finaliser
	x += 0x9e3779b97f4a7c15
	x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9
	x = (x ^ (x >> 27)) * 0x94d049bb133111eb
	return x ^ (x >> 31)
}

// Next fills p with the next len(p) bytes of the stream.
func (c *Content) Next(p []byte) {
	var w [8]byte
	for i := range p {
		off := c.off + int64(i)
		if i == 0 || off%8 == 0 {
			binary.LittleEndian.PutUint64(w[:], mix(c.seed^uint64(off/8)*0x100000001b3))
		}
		p[i] = w[off%8]
	}
	c.off += int64(len(p))
}

// Offset is how many bytes the stream has produced or checked.
func (c *Content) Offset() int64 { return c.off }

// Check compares p with the next len(p) bytes of the stream, naming the first differing offset.
func (c *Content) Check(p []byte) error {
	want := make([]byte, len(p))
	start := c.off
	c.Next(want)
	for i := range p {
		if p[i] != want[i] {
			return fmt.Errorf("content differs at byte offset %d: got 0x%02x, want 0x%02x", start+int64(i), p[i], want[i])
		}
	}
	return nil
}

// ChunkSize is the size of the n-th message of a generated stream: varied (1 byte to 256 KiB)
// so message boundaries are exercised, and deterministic.
func ChunkSize(seed uint64, n int) int {
	return 1 + int(mix(seed+uint64(n)*7919)%(256<<10))
}
