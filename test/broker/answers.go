package broker

import (
	"context"
	"strings"
	"time"

	amqp "github.com/rabbitmq/amqp091-go"
)

// answerTimeout bounds one probe: a broker on this machine answers in
// milliseconds, and one that is far away or absent should not hold us up.
const answerTimeout = 3 * time.Second

// Answers reports whether an AMQP handshake with url succeeds (connection
// opened with its credentials and vhost, then closed) within a few seconds.
func Answers(ctx context.Context, url string) bool {
	conn, err := dial(ctx, url)
	if err != nil {
		return false
	}
	conn.Close()
	return true
}

// identify returns the short name of the node that answers at url: the part
// of its cluster name before '@' (by default that is its node's short name).
func identify(ctx context.Context, url string) (string, error) {
	conn, err := dial(ctx, url)
	if err != nil {
		return "", err
	}
	defer conn.Close()
	name, _ := conn.Properties["cluster_name"].(string)
	short, _, _ := strings.Cut(name, "@")
	return short, nil
}

func dial(ctx context.Context, url string) (*amqp.Connection, error) {
	timeout := answerTimeout
	if deadline, ok := ctx.Deadline(); ok && time.Until(deadline) < timeout {
		timeout = time.Until(deadline)
	}
	if err := ctx.Err(); err != nil {
		return nil, err
	}
	props := amqp.NewConnectionProperties()
	props.SetClientConnectionName("warren broker probe")
	return amqp.DialConfig(url, amqp.Config{
		Dial:       amqp.DefaultDial(timeout),
		Properties: props,
	})
}
