package main

import (
	"database/sql"
	"regexp"

	amqp "github.com/rabbitmq/amqp091-go"
	"github.com/spf13/cobra"
)

// dbHandle is an open, migrated database.
type dbHandle struct{ *sql.DB }

var urlPassword = regexp.MustCompile(`(amqps?://[^:/@\s]*:)[^@\s]*@`)

// redactAll replaces the password of every AMQP URL in s.
func redactAll(s string) string { return urlPassword.ReplaceAllString(s, "${1}xxxxx@") }

// consumerTopology declares or verifies a consumer's queues; the consumer
// side sets it.
var consumerTopology func(cmd *cobra.Command, cfg Config, conn *amqp.Connection, verify bool) error
