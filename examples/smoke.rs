use ctsync::flow::*;
use ctsync::netlink::*;
fn main() {
    let ns = std::env::args().nth(1).unwrap();
    ctsync::netns::run_in(&ns, || {
        let origins = Origins::new();
        let mut w = Writer::open(1, &origins).unwrap();
        let mut flows = vec![];
        let t = Tuple { src: "10.1.0.1".parse().unwrap(), dst: "10.2.0.1".parse().unwrap(), proto: proto::TCP, l4: L4::Ports{src: 40000, dst: 80}};
        let mut f = Flow::new(Zone::default(), t, t.inverse());
        f.status = status::SEEN_REPLY | status::ASSURED;
        f.timeout = 300; f.mark = 7; f.protoinfo = ProtoInfo::Tcp(TcpInfo{state:3, wscale_orig:7, wscale_reply:7, flags_orig: 0x2b, flags_reply: 0x2b});
        flows.push(f.clone());
        // SNAT
        let t2 = Tuple { src: "10.1.0.2".parse().unwrap(), dst: "10.2.0.1".parse().unwrap(), proto: proto::UDP, l4: L4::Ports{src: 5000, dst: 53}};
        let mut r2 = t2.inverse(); r2.dst = "192.0.2.1".parse().unwrap(); r2.l4 = L4::Ports{src:53, dst: 6000};
        let mut g = Flow::new(Zone{id: 5, dir: ZoneDir::Both}, t2, r2);
        g.status = status::SRC_NAT | status::SRC_NAT_DONE | status::DST_NAT_DONE; g.timeout = 100; g.labels = 1<<3 | 1<<100;
        flows.push(g);
        let t3 = Tuple { src: "fd00::1".parse().unwrap(), dst: "fd00::2".parse().unwrap(), proto: proto::ICMPV6, l4: L4::Icmp{id: 9, kind: 128, code: 0}};
        let mut h = Flow::new(Zone{id: 3, dir: ZoneDir::Original}, t3, t3.inverse()); h.timeout = 30;
        flows.push(h);
        let t4 = Tuple { src: "10.1.0.3".parse().unwrap(), dst: "10.2.0.9".parse().unwrap(), proto: 99, l4: L4::None};
        let mut k = Flow::new(Zone::default(), t4, t4.inverse()); k.timeout = 60; k.status = status::DST_NAT | status::DST_NAT_DONE|status::SRC_NAT_DONE; k.reply.src = "10.3.3.3".parse().unwrap();
        flows.push(k);
        println!("{:?}", w.upsert(&flows));
        for f in &flows { println!("again {:?}", w.upsert(std::slice::from_ref(f))); }
        let s = CtSocket::open().unwrap();
        dump(&s, |m| { 
            let orig = flows.iter().find(|f| f.key == m.flow.key);
            if !orig.unwrap().same_state(&m.flow) { println!("K {}\nO {}", serde_json::to_string(&m.flow).unwrap(), serde_json::to_string(orig.unwrap()).unwrap()); }
        }).unwrap();
    }).unwrap();
}
