package main

import (
	"context"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/reflect/protoreflect"
	"google.golang.org/protobuf/reflect/protoregistry"
	"google.golang.org/protobuf/types/dynamicpb"

	"kasdtest/peer"
)

const (
	configService = "gitlab.agent.agent_configuration.rpc.AgentConfiguration"
	configMethod  = "/gitlab.agent.agent_configuration.rpc.AgentConfiguration/GetConfiguration"
)

func statusOf(err error) *status.Status { return status.Convert(err) }

// configLoop keeps AgentConfiguration/GetConfiguration open like agentk (skip_register: the pod
// registers through AgentRegistrar) and prints every configuration received. The messages are
// looked up by name in protobuf-go's registry, so the agent builds whether or not proto/ has the
// agent_configuration protos; without them it says so once ("config_unavailable") and stops.
func (a *agent) configLoop(ctx context.Context) {
	d, err := protoregistry.GlobalFiles.FindDescriptorByName(configService)
	if err != nil {
		peer.Event("config_unavailable", map[string]interface{}{"reason": "no " + configService + " in proto/"})
		return
	}
	m := d.(protoreflect.ServiceDescriptor).Methods().ByName("GetConfiguration")
	if m == nil {
		peer.Event("config_unavailable", map[string]interface{}{"reason": "no GetConfiguration method"})
		return
	}
	failures := 0
	for ctx.Err() == nil {
		opened := time.Now()
		err := a.configStream(ctx, m)
		if ctx.Err() != nil {
			return
		}
		ev := map[string]interface{}{}
		addStatus(ev, err)
		peer.Event("config_stream_ended", ev)
		if time.Since(opened) > 30*time.Second {
			failures = 0
		}
		failures++
		if !sleep(ctx, backoff(failures)) {
			return
		}
	}
}

func (a *agent) configStream(ctx context.Context, m protoreflect.MethodDescriptor) error {
	req := dynamicpb.NewMessage(m.Input())
	fields := req.Descriptor().Fields()
	if f := fields.ByName("agent_meta"); f != nil {
		b, err := proto.Marshal(a.meta)
		if err != nil {
			return err
		}
		meta := dynamicpb.NewMessage(f.Message())
		if err := proto.Unmarshal(b, meta); err != nil {
			return err
		}
		req.Set(f, protoreflect.ValueOfMessage(meta))
	}
	if f := fields.ByName("skip_register"); f != nil {
		req.Set(f, protoreflect.ValueOfBool(true))
	}
	stream, err := a.conn.NewStream(ctx, &grpc.StreamDesc{ServerStreams: true}, configMethod)
	if err != nil {
		return err
	}
	if err := stream.SendMsg(req); err != nil {
		return err
	}
	if err := stream.CloseSend(); err != nil {
		return err
	}
	for {
		resp := dynamicpb.NewMessage(m.Output())
		if err := stream.RecvMsg(resp); err != nil {
			return err
		}
		ev := map[string]interface{}{}
		if f := resp.Descriptor().Fields().ByName("commit_id"); f != nil {
			ev["commit_id"] = resp.Get(f).String()
		}
		if f := resp.Descriptor().Fields().ByName("configuration"); f != nil && resp.Has(f) {
			cfg := resp.Get(f).Message()
			for _, name := range []protoreflect.Name{"agent_id", "gitlab_external_url", "project_id"} {
				if cf := cfg.Descriptor().Fields().ByName(name); cf != nil {
					ev[string(name)] = cfg.Get(cf).Interface()
				}
			}
		}
		peer.Event("config", ev)
	}
}
