package consumer

import (
	"fmt"
	"io"
	"log/slog"
	"testing"

	"github.com/stretchr/testify/require"
)

// recorder is a settler that records the frames it is asked to send.
type recorder struct{ frames []string }

func (r *recorder) Ack(tag uint64, multiple bool) error {
	r.frames = append(r.frames, fmt.Sprintf("ack %d multiple=%v", tag, multiple))
	return nil
}

func (r *recorder) Nack(tag uint64, multiple, requeue bool) error {
	r.frames = append(r.frames, fmt.Sprintf("nack %d multiple=%v requeue=%v", tag, multiple, requeue))
	return nil
}

func TestAckerSettlesInDeliveryOrder(t *testing.T) {
	t.Parallel()
	newTest := func(tags ...uint64) (*acker, *recorder) {
		r := &recorder{}
		a := newAcker(r, slog.New(slog.NewTextHandler(io.Discard, nil)))
		for _, tag := range tags {
			a.add(tag)
		}
		return a, r
	}

	t.Run("ARunOfAcksIsOneMultipleAck", func(t *testing.T) {
		t.Parallel()
		a, r := newTest(1, 2, 3, 4)
		for _, tag := range []uint64{3, 1, 4, 2} {
			a.settle(tag, true)
		}
		require.False(t, a.flush(false))
		require.Equal(t, []string{"ack 4 multiple=true"}, r.frames)
	})

	t.Run("ANackIsSentOnItsOwnBeforeTheAcksAfterIt", func(t *testing.T) {
		t.Parallel()
		a, r := newTest(1, 2, 3, 4, 5)
		a.settle(1, true)
		a.settle(2, true)
		a.settle(3, false)
		a.settle(4, true)
		a.settle(5, true)
		require.False(t, a.flush(false))
		require.Equal(t, []string{
			"ack 2 multiple=true",
			"nack 3 multiple=false requeue=true",
			"ack 5 multiple=true",
		}, r.frames)
	})

	t.Run("FinishedDeliveriesWaitBehindAnUnfinishedOneThenGoAlone", func(t *testing.T) {
		t.Parallel()
		a, r := newTest(7, 8, 9, 10)
		a.settle(7, true)
		a.settle(9, true)
		a.settle(10, false)
		require.True(t, a.flush(false), "9 and 10 wait behind 8")
		require.Equal(t, []string{"ack 7 multiple=true"}, r.frames)

		// The held delay passed: 9 and 10 go on their own.
		require.False(t, a.flush(true))
		require.Equal(t, []string{
			"ack 7 multiple=true",
			"ack 9 multiple=false",
			"nack 10 multiple=false requeue=true",
		}, r.frames)

		// 8 finishes: its multiple ack covers nothing acked twice, and
		// nothing is sent again for 9 and 10.
		a.settle(8, true)
		a.add(11)
		require.False(t, a.flush(false))
		require.Equal(t, "ack 8 multiple=true", r.frames[len(r.frames)-1])
		a.settle(11, true)
		a.flush(false)
		require.Equal(t, "ack 11 multiple=true", r.frames[len(r.frames)-1])
		require.Len(t, r.frames, 5)
	})

	t.Run("ASettledDeliveryIsNotSettledTwice", func(t *testing.T) {
		t.Parallel()
		a, r := newTest(1)
		a.settle(1, true)
		a.settle(1, false) // ignored: settled already
		a.flush(false)
		a.settle(1, false) // ignored: gone
		a.settle(99, true) // ignored: unknown
		a.flush(true)
		require.Equal(t, []string{"ack 1 multiple=true"}, r.frames)
	})
}
