package publisher

import (
	"bytes"
	"errors"
	"fmt"
	"io"
	"net"
	"sync/atomic"
	"testing"
	"time"

	"github.com/stretchr/testify/require"
)

// slowConn counts the writes that reach it and takes a while for each, as
// a socket does under load.
type slowConn struct {
	net.Conn
	writes atomic.Int64
	fail   atomic.Bool
}

func (s *slowConn) Write(p []byte) (int, error) {
	s.writes.Add(1)
	if s.fail.Load() {
		return 0, errors.New("injected: connection reset")
	}
	time.Sleep(50 * time.Microsecond)
	return s.Conn.Write(p)
}

// TestCoalescingConnKeepsTheBytesAndGathersWrites: what goes in comes out
// whole and in order, back-to-back writes share system calls, a socket
// error reaches a later Write, and Close stops the writer.
func TestCoalescingConnKeepsTheBytesAndGathersWrites(t *testing.T) {
	client, server := net.Pipe()
	slow := &slowConn{Conn: client}
	c := newCoalescingConn(slow)

	var want bytes.Buffer
	got := make(chan []byte)
	go func() {
		b, _ := io.ReadAll(server)
		got <- b
	}()
	const n = 5000
	for i := range n {
		chunk := fmt.Appendf(nil, "frame %d;", i)
		want.Write(chunk)
		k, err := c.Write(chunk)
		require.NoError(t, err)
		require.Equal(t, len(chunk), k)
	}
	require.Eventually(t, func() bool {
		c.mu.Lock()
		defer c.mu.Unlock()
		return len(c.buf) == 0
	}, 5*time.Second, time.Millisecond)
	writes := slow.writes.Load()
	t.Logf("%d writes reached the socket in %d system calls", n, writes)
	require.Less(t, writes, int64(n/10), "back-to-back writes are gathered")

	// A failed socket write is reported by a later Write.
	slow.fail.Store(true)
	_, _ = c.Write([]byte("lost"))
	require.Eventually(t, func() bool {
		_, err := c.Write([]byte("x"))
		return err != nil
	}, 5*time.Second, time.Millisecond)

	require.NoError(t, c.Close())
	require.NoError(t, c.Close(), "Close twice")
	_, err := c.Write([]byte("after close"))
	require.Error(t, err)
	_ = server.Close()
	require.Equal(t, want.Bytes(), <-got, "every byte, in order, before the failure")
}
