//! Guest pages and grants: the allocator of the guest's pages, and the grants of data and
//! indirect pages, from each queue's pool of persistent grants (Linux blkfront's
//! `persistent_gnts`) or granted for one request and revoked after it.

use xdisk_xen::platform::GrantRef;

use crate::queue::Shadow;
use crate::{Error, Frontend, Result};

/// Pages of guest memory in use by the frontend.
pub(crate) struct PageAlloc {
    used: Vec<bool>,
    hint: usize,
}

impl PageAlloc {
    pub(crate) fn new(pages: usize) -> PageAlloc {
        PageAlloc {
            used: vec![false; pages],
            hint: 0,
        }
    }

    /// `n` contiguous free pages.
    pub(crate) fn alloc(&mut self, n: usize) -> Option<usize> {
        let len = self.used.len();
        if n == 0 || n > len {
            return None;
        }
        for pass in 0..2 {
            let (from, to) = if pass == 0 {
                (self.hint, len)
            } else {
                (0, len)
            };
            let mut run = 0;
            for i in from..to {
                if self.used[i] {
                    run = 0;
                    continue;
                }
                run += 1;
                if run == n {
                    let first = i + 1 - n;
                    self.used[first..=i].iter_mut().for_each(|u| *u = true);
                    self.hint = i + 1;
                    return Some(first);
                }
            }
        }
        None
    }

    pub(crate) fn free(&mut self, first: usize, n: usize) {
        if let Some(s) = self.used.get_mut(first..first + n) {
            s.iter_mut().for_each(|u| *u = false);
        }
        self.hint = self.hint.min(first);
    }
}

/// A granted data (or indirect) page.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Grant {
    pub(crate) page: usize,
    pub(crate) gref: GrantRef,
    /// From the queue's persistent pool (returned there, never revoked, after the request).
    persistent: bool,
}

impl Frontend {
    /// Revokes a grant and frees its page; a grant the backend still holds is counted as
    /// leaked and its page stays allocated.
    pub(crate) fn release(&mut self, g: Grant) {
        match self.dom.end_grant(g.gref) {
            Ok(true) => self.alloc.free(g.page, 1),
            _ => {
                tracing::warn!(gref = g.gref, "backend still holds a grant");
                self.leaked += 1;
            }
        }
    }

    /// Revokes every page of `s` (persistent ones too: the queue is going away).
    pub(crate) fn release_shadow(&mut self, s: Shadow) {
        for g in s.indirect.into_iter().chain(s.data) {
            self.release(g);
        }
    }

    /// A data page: from the persistent pool (granted read-write once) or newly granted.
    pub(crate) fn data_page(
        &mut self,
        qi: usize,
        persistent: bool,
        readonly: bool,
    ) -> Result<Grant> {
        if persistent {
            if let Some(g) = self.queues[qi].pool.pop() {
                return Ok(g);
            }
            if self.queues[qi].pool_total < self.cfg.max_persistent_grants {
                let page = self.alloc.alloc(1).ok_or(Error::NoMemory)?;
                let gref = match self.dom.grant(page, self.be_domid, false) {
                    Ok(g) => g,
                    Err(e) => {
                        self.alloc.free(page, 1);
                        return Err(e.into());
                    }
                };
                self.queues[qi].pool_total += 1;
                return Ok(Grant {
                    page,
                    gref,
                    persistent: true,
                });
            }
        }
        let page = self.alloc.alloc(1).ok_or(Error::NoMemory)?;
        match self.dom.grant(page, self.be_domid, readonly) {
            Ok(gref) => Ok(Grant {
                page,
                gref,
                persistent: false,
            }),
            Err(e) => {
                self.alloc.free(page, 1);
                Err(e.into())
            }
        }
    }

    /// Returns the pages of a finished (or failed) request: persistent ones to the queue's
    /// pool, the others revoked.
    pub(crate) fn release_shadow_local(&mut self, queue: usize, s: Shadow) {
        let Shadow {
            mut data,
            mut indirect,
            ..
        } = s;
        for list in [&mut data, &mut indirect] {
            for g in list.drain(..) {
                if g.persistent {
                    self.queues[queue].pool.push(g);
                } else {
                    self.release(g);
                }
            }
        }
        self.spare_grants.push(data);
        self.spare_grants.push(indirect);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn page_alloc() {
        let mut a = PageAlloc::new(10);
        assert_eq!(a.alloc(4), Some(0));
        assert_eq!(a.alloc(4), Some(4));
        assert_eq!(a.alloc(4), None);
        assert_eq!(a.alloc(2), Some(8));
        a.free(4, 4);
        assert_eq!(a.alloc(1), Some(4));
        assert_eq!(a.alloc(3), Some(5));
        assert_eq!(a.alloc(1), None);
        a.free(0, 10);
        assert_eq!(a.alloc(10), Some(0));
        assert_eq!(a.alloc(0), None);
        assert_eq!(PageAlloc::new(3).alloc(4), None);
    }
}
