package main

import (
	"database/sql"
	"regexp"
)

// dbHandle is an open, migrated database.
type dbHandle struct{ *sql.DB }

var urlPassword = regexp.MustCompile(`(amqps?://[^:/@\s]*:)[^@\s]*@`)

// redactAll replaces the password of every AMQP URL in s.
func redactAll(s string) string { return urlPassword.ReplaceAllString(s, "${1}xxxxx@") }
