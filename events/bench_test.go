package events_test

import (
	"fmt"
	"strings"
	"testing"

	"github.com/authbus/authbus/events"
)

// Workers decode every event they take, so Decode is on the hot path.
func BenchmarkEncode(b *testing.B) {
	p := samplePayloads()[0]
	b.ReportAllocs()
	for b.Loop() {
		if _, err := events.Encode(testKey, testSource, p); err != nil {
			b.Fatal(err)
		}
	}
}

func BenchmarkDecode(b *testing.B) {
	in, err := events.Encode(testKey, testSource, samplePayloads()[0])
	if err != nil {
		b.Fatal(err)
	}
	b.ReportAllocs()
	for b.Loop() {
		if _, err := events.Decode(events.Type401, testKey, in); err != nil {
			b.Fatal(err)
		}
	}
}

// Hostile bodies of the largest allowed size with as many members as fit:
// refusing them must stay cheap (it once cost 100 ms for a register request,
// from a quadratic duplicate check).
func BenchmarkRefuseManyMembers(b *testing.B) {
	for _, size := range []int{events.MaxEventSize, events.MaxRegisterSize} {
		in := manyMembers(size)
		b.Run(fmt.Sprint(size), func(b *testing.B) {
			b.ReportAllocs()
			for b.Loop() {
				var err error
				if size == events.MaxEventSize {
					_, err = events.Decode(events.Type401, testKey, in)
				} else {
					_, err = events.DecodeRegisterRequest(in)
				}
				if err == nil {
					b.Fatal("accepted")
				}
			}
		})
	}
}

func manyMembers(limit int) []byte {
	var sb strings.Builder
	sb.WriteString("{")
	for i := 0; sb.Len() < limit-20; i++ {
		if i > 0 {
			sb.WriteString(",")
		}
		fmt.Fprintf(&sb, `"%x":0`, i)
	}
	sb.WriteString("}")
	return []byte(sb.String())
}
