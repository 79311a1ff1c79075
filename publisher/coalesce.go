package publisher

import (
	"net"
	"sync"
)

// maxCoalesced bounds the bytes a coalescingConn holds for its writer: a
// Write beyond it waits, as it would in the kernel's socket buffer.
const maxCoalesced = 1 << 20

// coalescingConn is a net.Conn whose writes are gathered and written to the
// socket by a goroutine of its own. amqp091 flushes every publish (three
// frames) with a write system call of its own; when publishes come faster
// than the socket takes them, the ones queued during a write go out together
// in the next, so the publisher makes fewer system calls and the broker
// reads fewer, fuller segments. A lone publish is written at once.
//
// Write copies p and returns; an error of the socket is returned by the
// writes after it (amqp091 then closes the connection, and the publishes it
// did not confirm are failed and published again). Reads and deadlines go to
// the socket; Close closes it and stops the writer.
type coalescingConn struct {
	net.Conn

	mu      sync.Mutex
	drained *sync.Cond // the writer took the buffer, or failed
	buf     []byte     // written by callers, not yet by the writer
	spare   []byte
	err     error
	wake    chan struct{}
	done    chan struct{}
	once    sync.Once
}

func newCoalescingConn(c net.Conn) *coalescingConn {
	cc := &coalescingConn{Conn: c, wake: make(chan struct{}, 1), done: make(chan struct{})}
	cc.drained = sync.NewCond(&cc.mu)
	go cc.writeLoop()
	return cc
}

// Write queues p for the writer.
func (c *coalescingConn) Write(p []byte) (int, error) {
	c.mu.Lock()
	for c.err == nil && len(c.buf) > 0 && len(c.buf)+len(p) > maxCoalesced {
		c.drained.Wait()
	}
	if c.err != nil {
		err := c.err
		c.mu.Unlock()
		return 0, err
	}
	c.buf = append(c.buf, p...)
	c.mu.Unlock()
	select {
	case c.wake <- struct{}{}:
	default:
	}
	return len(p), nil
}

func (c *coalescingConn) writeLoop() {
	for {
		select {
		case <-c.wake:
		case <-c.done:
			return
		}
		for {
			c.mu.Lock()
			if len(c.buf) == 0 || c.err != nil {
				c.mu.Unlock()
				break
			}
			out := c.buf
			c.buf = c.spare[:0]
			c.mu.Unlock()
			_, err := c.Conn.Write(out)
			c.mu.Lock()
			c.spare = out[:0]
			if err != nil && c.err == nil {
				c.err = err
			}
			c.drained.Broadcast()
			c.mu.Unlock()
		}
	}
}

// Close closes the socket and stops the writer; later writes fail with
// net.ErrClosed.
func (c *coalescingConn) Close() error {
	err := c.Conn.Close()
	c.once.Do(func() {
		c.mu.Lock()
		if c.err == nil {
			c.err = net.ErrClosed
		}
		c.drained.Broadcast()
		c.mu.Unlock()
		close(c.done)
	})
	return err
}
