// Package redis is NOT go-redis.  It declares only the part of go-redis v9's API that the
// go-redis example of docs/protocol.md uses, with the same signatures, so that
// tests/test_docs_polyglot.py can type-check that example (go vet, GOPATH mode) on a
// machine that has no go-redis: Debian does not package it and the tests run offline.
// Every function panics: this package must never run.  If the example starts to use
// more of go-redis, declare it here from go-redis's own source, signature for signature.
package redis

import (
	"context"
	"time"
)

// RedisError is go-redis's internal/proto.RedisError.
type RedisError string

func (e RedisError) Error() string { return string(e) }

// Nil is what a command returns for a nil reply (BRPOP's timeout).
const Nil = RedisError("redis: nil")

type Options struct {
	Addr     string
	Password string
	DB       int
}

func ParseURL(redisURL string) (*Options, error) { panic("stub of go-redis: never runs") }

type Client struct{}

func NewClient(opt *Options) *Client { panic("stub of go-redis: never runs") }

func (c *Client) Close() error { panic("stub of go-redis: never runs") }

func (c *Client) LPush(ctx context.Context, key string, values ...interface{}) *IntCmd {
	panic("stub of go-redis: never runs")
}

func (c *Client) BRPop(ctx context.Context, timeout time.Duration, keys ...string) *StringSliceCmd {
	panic("stub of go-redis: never runs")
}

type IntCmd struct{}

func (cmd *IntCmd) Err() error             { panic("stub of go-redis: never runs") }
func (cmd *IntCmd) Val() int64             { panic("stub of go-redis: never runs") }
func (cmd *IntCmd) Result() (int64, error) { panic("stub of go-redis: never runs") }

type StringSliceCmd struct{}

func (cmd *StringSliceCmd) Err() error                { panic("stub of go-redis: never runs") }
func (cmd *StringSliceCmd) Val() []string             { panic("stub of go-redis: never runs") }
func (cmd *StringSliceCmd) Result() ([]string, error) { panic("stub of go-redis: never runs") }
